"""View pairing and the cross-entropy (excb.method.loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from excb.config import load_config
from excb.method.learner import ExcbLearner
from excb.method.loss import excb_loss, view_pairs
from excb.method.step import teacher_targets


def test_pairs_with_predictor_two_globals_six_locals() -> None:
    pairs = view_pairs(2, 8, use_predictor=True)
    assert len(pairs) == 18
    for i in range(2):
        mine = [p for p in pairs if p[0] == i]
        assert len(mine) == 9
        assert [(k, j) for _, k, j in mine if k == "direct"] == [("direct", 1 - i)]
        assert sorted(j for _, k, j in mine if k == "predicted") == list(range(8))  # view i included


def test_pairs_without_predictor_keep_local_crops() -> None:
    pairs = view_pairs(2, 8, use_predictor=False)
    assert len(pairs) == 14
    assert all(k == "direct" for _, k, _ in pairs)
    assert all(i != j for i, _, j in pairs)
    assert {j for _, _, j in pairs} == set(range(8))


def test_loss_value_matches_manual_average() -> None:
    gen = torch.Generator().manual_seed(0)
    b, k, tau = 5, 7, 0.1
    p = [torch.softmax(torch.randn(b, k, generator=gen), -1) for _ in range(2)]
    direct = [torch.randn(b, k, generator=gen) for _ in range(3)]
    pred = [torch.randn(b, k, generator=gen) for _ in range(3)]
    ce = lambda t, z: (-(t * F.log_softmax(z / tau, -1)).sum(-1)).mean()  # noqa: E731
    manual = [ce(p[0], direct[1]), ce(p[1], direct[0])]
    manual += [ce(p[i], pred[j]) for i in range(2) for j in range(3)]
    expected = torch.stack(manual).mean()
    torch.testing.assert_close(excb_loss(p, direct, pred, tau), expected)


def test_loss_gradients_reach_only_student() -> None:
    """In the loss, every student output gets a gradient; in a training step (the learner's), the teacher's
    targets carry no graph, no teacher parameter gets a gradient or changes except by the EMA, and every student
    parameter that takes part gets one."""
    z_t = torch.randn(4, 6)
    p = [torch.softmax(z_t, -1)] * 2
    direct = [torch.randn(4, 6, requires_grad=True) for _ in range(2)]
    loss = excb_loss(p, direct, None, 0.1)
    loss.backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in direct)

    cfg = load_config(None, ["model.convnet_widths=[8,16]", "model.projector_hidden=32", "model.projector_out=16",
                             "model.predictor_hidden=32", "model.num_prototypes=8", "augment.num_local=2",
                             "train.batch_size=8", "train.epochs=1"])
    learner = ExcbLearner(cfg, steps_per_epoch=2)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = learner.augment(images, 0.3, torch.Generator().manual_seed(1))
    targets, _, _ = teacher_targets(learner.teacher, learner.balancer, views[:2], cfg.method.teacher_temp)
    assert not any(t.requires_grad for t in targets)
    learner.step(images)
    assert all(not q.requires_grad and q.grad is None for q in learner.teacher.parameters())
    missing = [n for n, q in learner.student.named_parameters() if q.requires_grad and q.grad is None]
    assert missing == []