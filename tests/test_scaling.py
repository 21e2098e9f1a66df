"""The worker-count policy: fixed per-worker batch, linear lr scaling, epoch length from the global batch."""

from __future__ import annotations

import pytest

from excb.config import load_config
from excb.run.scaling import plan_for


def test_fixed_per_worker_batch_and_linear_lr() -> None:
    cfg = load_config(None, ["train.batch_size=256", "train.num_workers=[2,4]", "train.max_failures=3"])
    full, half = plan_for(cfg, 4, 60_000), plan_for(cfg, 2, 60_000)
    assert (full.per_worker_batch, full.global_batch, full.lr_scale) == (64, 256, 1.0)
    assert (half.per_worker_batch, half.global_batch, half.lr_scale) == (64, 128, 0.5)
    assert full.steps_per_epoch == 60_000 // 256 and half.steps_per_epoch == 60_000 // 128
    # resuming at an epoch boundary: the same point of the epoch-based schedules for either size
    assert full.start_step(3) / full.steps_per_epoch == half.start_step(3) / half.steps_per_epoch == 3


def test_fixed_worker_count_keeps_the_configured_batch() -> None:
    cfg = load_config(None, ["train.batch_size=256", "train.num_workers=2"])
    plan = plan_for(cfg, 2, 1000)
    assert (plan.global_batch, plan.per_worker_batch, plan.lr_scale, plan.steps_per_epoch) == (256, 128, 1.0, 3)
    with pytest.raises(ValueError, match="outside"):
        plan_for(cfg, 3, 1000)
