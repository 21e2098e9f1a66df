"""The per-interval progress line: rates over the interval, ETAs from recent seconds per step, resumed runs."""

from __future__ import annotations

import math

import pytest

from excb.run.progress import ProgressMeter, format_duration


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (12.4, "12s"), (59.4, "59s"), (59.6, "1m00s"), (185, "3m05s"), (3599.4, "59m59s"),
    (3600, "1h00m"), (3720, "1h02m"), (3749, "1h02m"), (3750, "1h03m"), (75 * 3600 + 600, "75h10m"),
    (-1, "--"), (math.nan, "--"), (math.inf, "--"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_first_intervals_of_a_fresh_run() -> None:
    meter = ProgressMeter(total_epochs=10, steps_per_epoch=500, global_batch=256, start_global_step=0)
    # 100 steps in 20 s: 0.2 s/step; 400 steps left in the epoch, 400 + 9 x 500 in the run
    assert meter.update(epoch=0, step_in_epoch=100, global_step=100, loss=3.21449, interval_seconds=20.0,
                        interval_wait_seconds=1.0) == (
        "epoch 1/10 step 100/500 | loss 3.2145 | 1280 img/s | data wait 5.0% | ETA epoch 1m20s, run 16m20s")
    # a slower interval: the rate is the interval's own, the ETA uses the recent mean (50 s / 200 steps)
    assert meter.update(epoch=0, step_in_epoch=200, global_step=200, loss=3.0, interval_seconds=30.0,
                        interval_wait_seconds=0.0) == (
        "epoch 1/10 step 200/500 | loss 3.0000 | 853 img/s | data wait 0.0% | ETA epoch 1m15s, run 20m00s")


def test_resumed_run_measures_only_its_own_steps() -> None:
    # resumed in epoch 4 (0-based 3) at its step 2000: the first interval holds 50 steps, not 17050
    meter = ProgressMeter(total_epochs=400, steps_per_epoch=5000, global_batch=1024, start_global_step=17000)
    assert meter.update(epoch=3, step_in_epoch=2050, global_step=17050, loss=5.0, interval_seconds=25.0,
                        interval_wait_seconds=10.0) == (
        "epoch 4/400 step 2050/5000 | loss 5.0000 | 2048 img/s | data wait 40.0% | ETA epoch 24m35s, run 275h25m")


def test_last_step_of_last_epoch_small_rate_and_nothing_new() -> None:
    meter = ProgressMeter(total_epochs=2, steps_per_epoch=5, global_batch=8, start_global_step=5)
    assert meter.update(epoch=1, step_in_epoch=5, global_step=10, loss=2.5, interval_seconds=10.0,
                        interval_wait_seconds=0.5) == (
        "epoch 2/2 step 5/5 | loss 2.5000 | 4.0 img/s | data wait 5.0% | ETA epoch 0s, run 0s")
    # called again for the same step: no new rate, the ETA still from the recent mean
    assert meter.update(epoch=1, step_in_epoch=5, global_step=10, loss=2.5, interval_seconds=0.0,
                        interval_wait_seconds=0.0) == (
        "epoch 2/2 step 5/5 | loss 2.5000 | -- img/s | data wait -- | ETA epoch 0s, run 0s")


def test_no_timed_step_yet_and_non_finite_loss() -> None:
    meter = ProgressMeter(total_epochs=3, steps_per_epoch=10, global_batch=64, start_global_step=0)
    assert meter.update(epoch=0, step_in_epoch=0, global_step=0, loss=math.nan, interval_seconds=1.0,
                        interval_wait_seconds=1.0) == (
        "epoch 1/3 step 0/10 | loss nan | -- img/s | data wait -- | ETA epoch --, run --")


def test_window_forgets_old_intervals() -> None:
    meter = ProgressMeter(total_epochs=1, steps_per_epoch=100, global_batch=1, start_global_step=0, window=2)
    for i, seconds in enumerate((100.0, 1.0, 1.0), start=1):  # one very slow interval, then two fast ones
        meter.update(epoch=0, step_in_epoch=10 * i, global_step=10 * i, loss=1.0, interval_seconds=seconds,
                     interval_wait_seconds=0.0)
    assert meter.seconds_per_step() == pytest.approx(0.1)
    assert meter.remaining_steps(0, 30) == (70, 70)
    with pytest.raises(ValueError):
        ProgressMeter(total_epochs=1, steps_per_epoch=1, global_batch=1, start_global_step=0, window=0)
