"""Per-step schedules (excb.schedules)."""

from __future__ import annotations

import numpy as np
import pytest

from excb.config import load_config
from excb.schedules import build_schedules, cosine_schedule, steps_per_epoch


def test_cosine_endpoints_and_warmup() -> None:
    s = cosine_schedule(1.0, 0.1, 100, warmup_steps=10)
    assert len(s) == 100
    assert s[0] == 0.0 and s[9] < 1.0
    assert s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[:11]) > 0) and np.all(np.diff(s[10:]) <= 1e-12)


def test_schedules_follow_the_method() -> None:
    cfg = load_config(None, ["train.epochs=4", "optim.lr=0.6", "optim.warmup_epochs=1", "optim.weight_decay=0.04",
                             "optim.weight_decay_end=0.4", "augment.crop_min_start=0.26",
                             "augment.crop_min_end=0.14"])
    s = build_schedules(cfg, steps_per_epoch=10)
    assert s.total_steps == 40
    assert s.lr[0] == 0 and s.lr[10] == pytest.approx(0.6) and s.lr[-1] == pytest.approx(0.6e-4)
    assert s.ema_momentum[0] == pytest.approx(0.996) and s.ema_momentum[-1] == pytest.approx(1.0)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4)
    # prototype wd: 10× the wd at the start, 1× at the end
    assert s.prototype_weight_decay[0] == pytest.approx(0.4) and s.prototype_weight_decay[-1] == pytest.approx(0.4)
    assert s.prototype_weight_decay[20] / s.weight_decay[20] == pytest.approx(5.5, rel=0.05)
    assert len(s.crop_min_scale) == 4
    assert s.crop_min_scale[0] == pytest.approx(0.26) and s.crop_min_scale[-1] == pytest.approx(0.14)


def test_schedules_scale_with_real_step_count() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.warmup_epochs=1"])
    a, b = build_schedules(cfg, 5), build_schedules(cfg, 50)
    assert a.total_steps == 15 and b.total_steps == 150
    assert a.lr[5] == pytest.approx(b.lr[50])  # warm-up ends after one epoch whatever its length


def test_steps_per_epoch_drops_last() -> None:
    assert steps_per_epoch(1000, 256) == 3
    with pytest.raises(ValueError):
        steps_per_epoch(100, 256)
