"""Training schedules, written in epochs or fractions and converted to per-step arrays once.

Every array is indexed by the 0-based global optimiser step ``s`` (``T = epochs × steps_per_epoch`` steps in all),
so resuming at step ``s`` reads exactly the values an uninterrupted run would have used. The indexing follows the
authors' released code (``ManiadisG/ExCB``) step for step:

- lr and both weight decays are set by a scheduler whose step counter is incremented *before* the values are
  computed (``engine/optimizer.py``, ``LRScheduler.step``, called before every optimiser step), so optimiser
  step ``s`` uses ``u = s + 1``: the first step already has a non-zero lr and the last step (u = T) sits exactly
  on the end values.
- the EMA momentum is computed from the 0-based step counter itself (``engine/trainer.py``, ``train_epoch``), so
  step 0 uses exactly ``ema_start`` and the last step is just below ``ema_end``.
- the crop scale is set once per epoch from the 0-based epoch ``e`` of ``E`` (``engine/trainer.py``), so epoch 0
  uses exactly ``crop_min_start`` and the last epoch is just above ``crop_min_end``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from excb.config import ExcbConfig


def cosine_anneal(start: float, end: float, t: np.ndarray | float, period: float) -> np.ndarray:
    """Half-cosine from ``start`` (t = 0) to ``end`` (t = period), in float64:

        v(t) = end + (start − end)·(1 + cos(π·t / period))/2.

    Works in either direction (start above or below end); start == end gives the constant exactly.
    """
    if period <= 0:
        raise ValueError(f"period must be > 0, got {period}")
    t = np.asarray(t, dtype=np.float64)
    return end + (start - end) * 0.5 * (1.0 + np.cos(np.pi * t / period))


def warmup_cosine_lr(lr: float, min_lr: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Learning rate of optimiser steps s = 0 … T−1 (T = ``total_steps``, W = ``warmup_steps``), with u = s + 1:

        lr(u) = lr·u/W                                                   for u < W
        lr(u) = min_lr + (lr − min_lr)·(1 + cos(π·(u − W)/(T − W)))/2     for u ≥ W

    so the warm-up ends on the peak at u = W (step s = W − 1) and the last step (u = T) is exactly ``min_lr``.
    W ≥ T keeps the whole run in warm-up (W = T: the last step is the peak).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(int(warmup_steps), 0)
    u = np.arange(1, total_steps + 1, dtype=np.float64)
    warm = lr * u / max(warmup_steps, 1)
    decay = cosine_anneal(lr, min_lr, u - warmup_steps, max(total_steps - warmup_steps, 1))
    return np.where(u < warmup_steps, warm, decay)


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

    With s = 0 … T−1 the optimiser step, u = s + 1, T = epochs·steps_per_epoch, W = round(warmup_epochs·
    steps_per_epoch), and e = 0 … E−1 the epoch of E:

    - lr[s] = :func:`warmup_cosine_lr` at u with peak lr·``lr_scale`` and floor lr·``lr_scale``·min_lr_ratio
      (linear warm-up lr·u/W for u < W, then cosine over u − W of T − W).
    - weight_decay[s] = wd_end + (wd − wd_end)·(1 + cos(π·u/T))/2 (either direction; constant when equal).
    - prototype_weight_decay[s] = weight_decay[s]·f(u), f(u) = f_end + (f_start − f_end)·(1 + cos(π·u/T))/2
      with f_start = ``prototype_wd_start_factor``, f_end = ``..._end_factor`` (10 → 1: the released "wdx10c1").
    - ema_momentum[s] = ema_end + (ema_start − ema_end)·(1 + cos(π·s/T))/2 (note: s, not u).
    - crop_min_scale[e] = crop_min_end + (crop_min_start − crop_min_end)·(1 + cos(π·e/E))/2.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    o, me, a = cfg.optim, cfg.method, cfg.augment
    epochs = cfg.train.epochs
    total = epochs * steps_per_epoch
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    lr0 = o.lr * lr_scale
    lr = warmup_cosine_lr(lr0, lr0 * o.min_lr_ratio, total, warmup)
    s = np.arange(total, dtype=np.float64)
    u = s + 1.0
    wd = cosine_anneal(o.weight_decay, o.weight_decay_end, u, total)
    factor = cosine_anneal(o.prototype_wd_start_factor, o.prototype_wd_end_factor, u, total)
    ema = cosine_anneal(me.ema_start, me.ema_end, s, total)
    crop = cosine_anneal(a.crop_min_start, a.crop_min_end, np.arange(epochs, dtype=np.float64), epochs)
    return Schedules(lr=lr, weight_decay=wd, prototype_weight_decay=wd * factor, ema_momentum=ema,
                     crop_min_scale=crop, steps_per_epoch=steps_per_epoch)


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Steps every rank runs per epoch: floor(rows / global batch) (drop_last), at least one."""
    if num_rows < global_batch:
        raise ValueError(f"dataset has {num_rows} rows, fewer than one global batch of {global_batch}")
    return max(1, math.floor(num_rows / global_batch))
