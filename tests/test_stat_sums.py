"""Step statistics kept on the device (excb.run.stat_sums): the same epoch sums as reading every step, one read per
interval, and a non-finite loss named by its step at the next read."""

from __future__ import annotations

import math

import pytest
import torch
from test_learner import _learner

from excb.method.step import STAT_KEYS, NonFiniteLossError, StepStats
from excb.run.stat_sums import StatSums


def _stats(loss: float, step: int = 0) -> StepStats:
    t = torch.tensor
    return StepStats(loss=t(loss), teacher_confidence=t(0.5 + step), unique_targets=t(float(step)),
                     changed_by_balancing=t(0.25))


def test_device_sums_equal_per_step_reads() -> None:
    """Two learners from the same seed: one read after every step (the loop before), one summed on the device and
    read every third step and at the end; identical sums and identical last-step values."""
    (a, images), (b, _) = _learner(), _learner()
    per_step = dict.fromkeys(STAT_KEYS, 0.0)
    sums = StatSums(torch.device("cpu"), epoch=0)
    for i in range(7):
        batch = images[i * 32:(i + 1) * 32]
        sa = a.step(batch, 0, torch.Generator().manual_seed(i))
        for k in STAT_KEYS:
            per_step[k] += float(getattr(sa, k))
        sums.add(b.step(batch, 0, torch.Generator().manual_seed(i), check_finite=False), b.global_step - 1)
        if i % 3 == 2:
            last = sums.read().last
            assert last == {k: float(getattr(sa, k)) for k in STAT_KEYS}
    assert sums.read().sums == per_step
    assert 1 <= per_step["unique_targets"] / 7 <= a.cfg.model.num_prototypes


def test_unique_targets_count_distinct_argmax_labels() -> None:
    learner, images = _learner()
    stats = learner.step(images[:64], 0, torch.Generator().manual_seed(0))
    assert float(stats.unique_targets) == int(float(stats.unique_targets)) >= 1
    p = torch.softmax(torch.randn(50, 12), dim=1)  # the formula the step uses, against torch.unique
    used = torch.zeros(12).index_fill_(0, p.argmax(-1), 1.0).sum()
    assert int(used) == p.argmax(-1).unique().numel()


def test_a_non_finite_loss_is_named_by_its_step_at_the_next_read() -> None:
    sums = StatSums(torch.device("cpu"), epoch=3)
    for j, loss in enumerate([1.0, 2.0]):
        sums.add(_stats(loss, j), 10 + j)
    assert sums.read().sums["loss"] == 3.0
    for j, loss in enumerate([1.5, float("inf"), float("nan")]):
        sums.add(_stats(loss, j), 12 + j)
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at epoch 3, step 13"):
        sums.read()


def test_the_step_skips_the_check_only_when_asked() -> None:
    learner, images = _learner()
    with torch.no_grad():
        learner.student.projector[0].weight.fill_(float("nan"))
    stats = learner.step(images[:64], check_finite=False)
    assert math.isnan(float(stats.loss))
    with pytest.raises(NonFiniteLossError, match="epoch 0, step 1"):
        learner.step(images[:64])
