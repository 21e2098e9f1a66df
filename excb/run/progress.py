"""One progress line per logging interval: where the run is, how fast it goes and when it will be done.

Pure (no Ray, no torch): rank 0 of the training loop feeds :class:`ProgressMeter` the numbers of each logging
interval and prints the line it returns through :func:`excb.console.info`, e.g.::

    [excb] epoch 3/100 step 120/500 | loss 3.2145 | 1234 img/s | data wait 4.2% | ETA epoch 1m05s, run 2h03m

Images per second and the data-wait share are the interval's own. The ETAs are the steps still to do times the
recent seconds per step: the mean over the last few intervals, so one slow interval (a checkpoint, an evaluation)
does not swing them much. The run's ETA counts the rest of this epoch and every later epoch at the current
``steps_per_epoch``. A resumed run (started at ``start_global_step``) measures its speed from its own steps only.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["ProgressMeter", "format_duration"]

UNKNOWN = "--"


def format_duration(seconds: float) -> str:
    """``12s``, ``3m05s``, ``1h02m`` (hours keep counting past a day: ``75h10m``); ``--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return UNKNOWN
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m}m{s:02d}s"
    h, m = divmod((s + 30) // 60, 60)
    return f"{h}h{m:02d}m"


def _rate(images_per_second: float) -> str:
    return f"{images_per_second:.0f}" if images_per_second >= 100 else f"{images_per_second:.1f}"


class ProgressMeter:
    """Formats the progress line of each logging interval (see the module docstring).

    ``total_epochs``: the run's epochs; ``steps_per_epoch``: optimizer steps per epoch (may be changed between
    updates, e.g. after an elastic resize); ``global_batch``: images per step over all workers;
    ``start_global_step``: the global step the run (or this attempt of it) started from, 0 for a fresh run.
    ``window``: how many recent intervals the seconds per step are averaged over.
    """

    def __init__(self, total_epochs: int, steps_per_epoch: int, global_batch: int, start_global_step: int,
                 window: int = 5) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.total_epochs = int(total_epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.global_batch = int(global_batch)
        self.last_global_step = int(start_global_step)
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)  # (steps, seconds) of recent intervals

    def seconds_per_step(self) -> float | None:
        """Mean seconds per step over the recent intervals; None before any step was timed."""
        steps = sum(n for n, _ in self._recent)
        seconds = sum(t for _, t in self._recent)
        return seconds / steps if steps > 0 and seconds > 0 else None

    def remaining_steps(self, epoch: int, step_in_epoch: int) -> tuple[int, int]:
        """(steps left in this epoch, steps left in the run) after ``step_in_epoch`` steps of 0-based ``epoch``."""
        in_epoch = max(self.steps_per_epoch - step_in_epoch, 0)
        later_epochs = max(self.total_epochs - epoch - 1, 0)
        return in_epoch, in_epoch + later_epochs * self.steps_per_epoch

    def update(self, epoch: int, step_in_epoch: int, global_step: int, loss: float, interval_seconds: float,
               interval_wait_seconds: float) -> str:
        """The line for the interval that ended after step ``step_in_epoch`` (steps done in 0-based ``epoch``) at
        ``global_step``, which took ``interval_seconds`` of which ``interval_wait_seconds`` waiting for data."""
        steps = int(global_step) - self.last_global_step
        self.last_global_step = int(global_step)
        if steps > 0 and interval_seconds > 0:
            self._recent.append((steps, float(interval_seconds)))
            images_per_second = _rate(steps * self.global_batch / interval_seconds)
            wait = f"{100.0 * min(max(interval_wait_seconds / interval_seconds, 0.0), 1.0):.1f}%"
        else:  # nothing new to measure (a repeated call, or a clock that did not move)
            images_per_second, wait = UNKNOWN, UNKNOWN
        per_step = self.seconds_per_step()
        left_epoch, left_run = self.remaining_steps(epoch, step_in_epoch)
        eta_epoch = format_duration(left_epoch * per_step) if per_step is not None else UNKNOWN
        eta_run = format_duration(left_run * per_step) if per_step is not None else UNKNOWN
        loss_text = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        return (f"epoch {epoch + 1}/{self.total_epochs} step {step_in_epoch}/{self.steps_per_epoch} | "
                f"loss {loss_text} | {images_per_second} img/s | data wait {wait} | "
                f"ETA epoch {eta_epoch}, run {eta_run}")
