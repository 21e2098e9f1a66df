"""Per-step schedules (excb.method.schedules), indexed like the authors' released code.

Step ``s`` is the 0-based optimiser step of ``T``. lr and weight decays use ``u = s + 1`` (the released
LRScheduler increments its counter before computing); the EMA momentum uses ``s``; the crop scale the 0-based
epoch. tests/test_released_equivalence.py compares every value with reference functions of the released code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from excb.config import load_config
from excb.method.schedules import (
    build_schedules,
    cosine_anneal,
    steps_per_epoch,
    warmup_cosine_lr,
)


def test_cosine_anneal_endpoints_both_directions() -> None:
    t = np.arange(11)
    down, up = cosine_anneal(1.0, 0.1, t, 10), cosine_anneal(0.04, 0.4, t, 10)
    assert down[0] == pytest.approx(1.0) and down[5] == pytest.approx(0.55) and down[10] == pytest.approx(0.1)
    assert up[0] == pytest.approx(0.04) and up[10] == pytest.approx(0.4)
    assert np.all(np.diff(down) < 0) and np.all(np.diff(up) > 0)
    assert np.all(cosine_anneal(1e-4, 1e-4, t, 10) == 1e-4)  # equal ends: exactly constant
    with pytest.raises(ValueError):
        cosine_anneal(1.0, 0.0, t, 0)


def test_warmup_cosine_lr_counts_from_one() -> None:
    lr = warmup_cosine_lr(1.0, 0.1, 100, 10)
    assert len(lr) == 100
    assert lr[0] == pytest.approx(0.1)  # u = 1: lr·1/W, never zero
    assert lr[8] == pytest.approx(0.9) and lr[9] == pytest.approx(1.0)  # the peak at u = W (step W − 1)
    assert lr[-1] == pytest.approx(0.1)  # u = T: exactly the floor
    assert np.all(np.diff(lr[:10]) > 0) and np.all(np.diff(lr[9:]) < 0)
    assert lr[54] == pytest.approx(0.55)  # u = 55: half-way through the 90 cosine steps
    no_warm = warmup_cosine_lr(1.0, 0.0, 4, 0)
    assert no_warm == pytest.approx([0.5 * (1 + math.cos(math.pi * u / 4)) for u in (1, 2, 3, 4)])
    assert warmup_cosine_lr(1.0, 0.0, 5, 5)[-1] == pytest.approx(1.0)  # warm-up spans the run: ends on the peak
    assert warmup_cosine_lr(1.0, 0.0, 5, 10) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_schedules_follow_the_released_code() -> None:
    cfg = load_config(None, ["train.epochs=4", "optim.lr=0.6", "optim.warmup_epochs=1", "optim.weight_decay=0.04",
                             "optim.weight_decay_end=0.4", "augment.crop_min_start=0.26",
                             "augment.crop_min_end=0.14"])
    s = build_schedules(cfg, steps_per_epoch=10)
    assert s.total_steps == 40
    assert s.lr[0] == pytest.approx(0.06) and s.lr[9] == pytest.approx(0.6) and s.lr[-1] == pytest.approx(0.6e-4)
    # EMA from the 0-based step: exactly 0.996 at step 0, just below 1 at the last step
    assert s.ema_momentum[0] == pytest.approx(0.996, abs=1e-12)
    assert s.ema_momentum[-1] == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi * 39 / 40)) / 2, abs=1e-12)
    assert s.ema_momentum[-1] < 1.0
    # weight decay from u = s + 1: just above 0.04 at step 0, exactly 0.4 at the last step
    assert s.weight_decay[0] == pytest.approx(0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi / 40)) / 2)
    assert s.weight_decay[-1] == pytest.approx(0.4)
    # prototype wd: 10× the wd at u = 0, 1× at u = T
    f0 = 1 + 9 * (1 + math.cos(math.pi / 40)) / 2
    assert s.prototype_weight_decay[0] == pytest.approx(s.weight_decay[0] * f0)
    assert s.prototype_weight_decay[-1] == pytest.approx(0.4)
    assert s.prototype_weight_decay[19] / s.weight_decay[19] == pytest.approx(5.5)  # u = T/2
    assert len(s.crop_min_scale) == 4
    assert s.crop_min_scale[0] == pytest.approx(0.26)
    assert s.crop_min_scale[-1] == pytest.approx(0.14 + 0.12 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    assert s.crop_min_scale[-1] > 0.14
    for arr in (s.lr, s.weight_decay, s.prototype_weight_decay, s.ema_momentum, s.crop_min_scale):
        assert arr.dtype == np.float64


def test_constant_weight_decay_is_exactly_constant() -> None:
    s = build_schedules(load_config(None, ["train.epochs=2"]), steps_per_epoch=7)  # defaults: 1e-4 → 1e-4
    assert np.all(s.weight_decay == 1e-4)
    assert s.prototype_weight_decay[-1] == pytest.approx(1e-4) and s.prototype_weight_decay[0] < 1e-3


def test_lr_scale_multiplies_the_lr_only() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.warmup_epochs=1"])
    a, b = build_schedules(cfg, 5), build_schedules(cfg, 5, lr_scale=0.5)
    np.testing.assert_allclose(b.lr, 0.5 * a.lr, rtol=1e-15)
    np.testing.assert_array_equal(a.weight_decay, b.weight_decay)
    np.testing.assert_array_equal(a.ema_momentum, b.ema_momentum)


def test_schedules_scale_with_real_step_count() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.warmup_epochs=1"])
    a, b = build_schedules(cfg, 5), build_schedules(cfg, 50)
    assert a.total_steps == 15 and b.total_steps == 150
    assert a.lr[4] == pytest.approx(b.lr[49]) == pytest.approx(cfg.optim.lr)  # warm-up ends after one epoch
    assert a.lr[-1] == pytest.approx(b.lr[-1])
    np.testing.assert_allclose(a.crop_min_scale, b.crop_min_scale)


def test_steps_per_epoch_drops_last() -> None:
    assert steps_per_epoch(1000, 256) == 3
    with pytest.raises(ValueError):
        steps_per_epoch(100, 256)
