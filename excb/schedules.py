"""Training schedules, written in epochs or fractions and converted to per-step arrays once.

Every array is indexed by the global optimiser step, so resuming at step ``t`` reads exactly the values an
uninterrupted run would have used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from excb.config import ExcbConfig


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then

        v(t) = end + (start − end)·(1 + cos(π·t / T))/2,   t = 0 … T−1,  T = total_steps − warmup_steps.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps else np.empty(0)
    rest = total_steps - warmup_steps
    t = np.arange(rest)
    cos = end + 0.5 * (start - end) * (1.0 + np.cos(np.pi * t / max(rest - 1, 1))) if rest > 1 else np.full(rest, start)
    return np.concatenate([warm, cos]).astype(np.float64)


@dataclass(frozen=True)
class Schedules:
    """Per-step values for the whole run (length = epochs × steps_per_epoch) and per-epoch crop scale."""

    lr: np.ndarray
    weight_decay: np.ndarray
    prototype_weight_decay: np.ndarray
    ema_momentum: np.ndarray
    crop_min_scale: np.ndarray  # per epoch
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return int(self.lr.shape[0])


def build_schedules(cfg: ExcbConfig, steps_per_epoch: int, lr_scale: float = 1.0) -> Schedules:
    """Convert the config's epoch-based schedules to per-step arrays for ``steps_per_epoch`` real steps.

    - lr: warm-up over ``optim.warmup_epochs`` then cosine from lr to lr·min_lr_ratio (times ``lr_scale``).
    - weight decay: cosine from ``weight_decay`` to ``weight_decay_end``.
    - prototype weight decay: wd(t)·f(t), f cosine from ``prototype_wd_start_factor`` to ``..._end_factor``.
    - EMA momentum: cosine from ``ema_start`` to ``ema_end``.
    - crop s_min: cosine per epoch from ``crop_min_start`` to ``crop_min_end``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    o, me, a = cfg.optim, cfg.method, cfg.augment
    total = cfg.train.epochs * steps_per_epoch
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    lr0 = o.lr * lr_scale
    lr = cosine_schedule(lr0, lr0 * o.min_lr_ratio, total, warmup_steps=warmup, warmup_start=0.0)
    wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
    factor = cosine_schedule(o.prototype_wd_start_factor, o.prototype_wd_end_factor, total)
    ema = cosine_schedule(me.ema_start, me.ema_end, total)
    crop = cosine_schedule(a.crop_min_start, a.crop_min_end, cfg.train.epochs)
    return Schedules(lr=lr, weight_decay=wd, prototype_weight_decay=wd * factor, ema_momentum=ema,
                     crop_min_scale=crop, steps_per_epoch=steps_per_epoch)


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Steps every rank runs per epoch: floor(rows / global batch) (drop_last), at least one."""
    if num_rows < global_batch:
        raise ValueError(f"dataset has {num_rows} rows, fewer than one global batch of {global_batch}")
    return max(1, math.floor(num_rows / global_batch))
