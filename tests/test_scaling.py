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


def test_kmeans_init_that_cannot_draw_k_features_is_refused_on_the_driver() -> None:
    """Refused before any worker starts (a worker raising it would be restarted forever with max_failures=-1)."""
    from excb.run.scaling import check_kmeans_init_feasible

    cfg = load_config(None, ["model.num_prototypes=64", "method.kmeans_samples=64", "train.batch_size=16",
                             "train.num_workers=[1,2]", "train.max_failures=-1"])
    check_kmeans_init_feasible(cfg, 64)  # 4 steps of 16 (2 workers) or of 8 (1 worker: 8 steps): 64 either way
    with pytest.raises(ValueError, match=r"would draw 48 feature\(s\) with 1 worker.*num_prototypes=64"):
        check_kmeans_init_feasible(cfg, 48)  # 1 worker: 6 steps of 8
    bounded = load_config(None, ["model.num_prototypes=64", "method.kmeans_samples=64", "train.batch_size=16",
                                 "train.max_steps_per_epoch=3"])
    with pytest.raises(ValueError, match="would draw 48"):
        check_kmeans_init_feasible(bounded, 10_000)
    check_kmeans_init_feasible(load_config(None, ["model.num_prototypes=64", "method.kmeans_samples=64",
                                                  "train.batch_size=16", "method.kmeans_init=false"]), 16)
