"""How a run's batch, learning rate and step count follow the number of workers (fixed or elastic).

Policy (one rule for fixed and elastic runs):

- ``train.batch_size`` is the global batch at ``max_workers`` workers; the **per-worker batch is fixed** at
  ``b = batch_size / max_workers``, so a group of ``W`` workers trains with global batch ``B_W = b · W``;
- the **learning rate scales linearly** with the global batch: ``lr_W = optim.lr · B_W / batch_size = optim.lr · W /
  max_workers`` (warm-up and cosine shape unchanged);
- an epoch is ``⌊rows / B_W⌋`` steps on every rank (the shards are split equally, so no rank runs out early),
  or ``train.max_steps_per_epoch`` when that is smaller (a bounded run);
- schedules are defined in epochs and converted to steps for the group's size each time a worker group starts;
  a group starts at an epoch boundary (resume is per epoch), at global step ``epoch · ⌊rows / B_W⌋``.
"""

from __future__ import annotations

from dataclasses import dataclass

from excb.config import ExcbConfig
from excb.method.schedules import steps_per_epoch


@dataclass(frozen=True)
class GroupPlan:
    """Batch, learning-rate scale and steps per epoch for a worker group of ``workers`` ranks."""

    workers: int
    per_worker_batch: int
    global_batch: int
    lr_scale: float
    steps_per_epoch: int

    def start_step(self, epoch: int) -> int:
        """Global step at the start of ``epoch`` (0-based) for this group size."""
        return epoch * self.steps_per_epoch


def plan_for(cfg: ExcbConfig, workers: int, train_rows: int) -> GroupPlan:
    """``B_W = b · W`` with ``b = batch_size / max_workers``; ``lr_scale = W / max_workers``; ``⌊rows / B_W⌋`` steps."""
    t = cfg.train
    if not 1 <= workers <= t.max_workers:
        raise ValueError(f"{workers} workers is outside train.num_workers {t.num_workers}")
    b = t.per_worker_batch
    spe = steps_per_epoch(train_rows, b * workers)
    if t.max_steps_per_epoch:  # a bounded run (benchmarks, smoke tests): schedules follow the shorter epoch
        spe = min(spe, t.max_steps_per_epoch)
    return GroupPlan(workers=workers, per_worker_batch=b, global_batch=b * workers,
                     lr_scale=workers / t.max_workers, steps_per_epoch=spe)
