"""Step statistics summed on the training device and read back once per logging interval.

Each step adds its :class:`excb.method.step.StepStats` vector to a float64 sum S on the device and keeps its loss
ℓ_s on the device; :meth:`StatSums.read` copies the interval's losses, the last step's statistics and S to the host
in one transfer, and raises :class:`excb.method.step.NonFiniteLossError` naming the first step s of the interval
with a non-finite ℓ_s. The loop reads at every logging step, before every checkpoint and at the end of the epoch,
so no checkpoint is written after a non-finite loss; a step with a non-finite loss may update the weights (up to
one interval of them) before the run stops, and those weights are never saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from excb.method.step import STAT_KEYS, NonFiniteLossError, StepStats


@dataclass
class IntervalRead:
    """What one read returns: the last step's statistics and the epoch's sums so far (this rank), as floats."""

    last: dict[str, float]
    sums: dict[str, float]


@dataclass
class StatSums:
    """Sums over an epoch (this rank) of the statistics in :data:`STAT_KEYS`, kept on ``device``."""

    device: torch.device
    epoch: int = 0
    _sum: Tensor | None = None
    _losses: list[Tensor] = field(default_factory=list)
    _first_step: int = 0
    _last: Tensor | None = None

    def add(self, stats: StepStats, global_step: int) -> None:
        """Add one step's statistics (``global_step``: the step's index, named when its loss is not finite)."""
        vec = stats.vector()
        self._sum = vec if self._sum is None else self._sum + vec
        if not self._losses:
            self._first_step = global_step
        self._losses.append(vec[0])
        self._last = vec

    def read(self) -> IntervalRead:
        """One host transfer: check the interval's losses (raising NonFiniteLossError for the first bad one),
        start a new interval, and return the last step's statistics and the sums."""
        zeros = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.device)
        parts = [torch.stack(self._losses) if self._losses else zeros[:0],
                 zeros if self._last is None else self._last, zeros if self._sum is None else self._sum]
        host = torch.cat(parts).cpu()
        n, k = len(self._losses), len(STAT_KEYS)
        losses = host[:n]
        bad = (~torch.isfinite(losses)).nonzero()
        if bad.numel():
            j = int(bad[0, 0])
            raise NonFiniteLossError(f"loss is {losses[j].item()} at epoch {self.epoch}, step {self._first_step + j}")
        self._losses = []
        last, sums = host[n:n + k].tolist(), host[n + k:].tolist()
        return IntervalRead(last=dict(zip(STAT_KEYS, last, strict=True)), sums=dict(zip(STAT_KEYS, sums, strict=True)))
