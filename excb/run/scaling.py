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


def check_kmeans_init_feasible(cfg: ExcbConfig, train_rows: int) -> None:
    """Refuse, on the driver, a k-means prototype init that cannot start: every group size W the run may have
    draws ``min(W · ⌈kmeans_samples / W⌉, W · b · steps_per_epoch(W))`` features, which must be at least K.

    A worker raising this instead would be restarted forever under ``train.max_failures=-1``."""
    if not cfg.method.kmeans_init:
        return
    k = cfg.model.num_prototypes
    for workers in range(cfg.train.min_workers, cfg.train.max_workers + 1):
        plan = plan_for(cfg, workers, train_rows)
        drawn = min(workers * -(-cfg.method.kmeans_samples // workers),
                    plan.global_batch * plan.steps_per_epoch)
        if drawn < k:
            raise ValueError(
                f"k-means prototype init would draw {drawn} feature(s) with {workers} worker(s) for "
                f"model.num_prototypes={k} clusters ({train_rows} training images, method.kmeans_samples="
                f"{cfg.method.kmeans_samples}, {plan.steps_per_epoch} step(s) of {plan.global_batch} per epoch): "
                "raise method.kmeans_samples, use more data, lower model.num_prototypes, or set "
                "method.kmeans_init=false")
