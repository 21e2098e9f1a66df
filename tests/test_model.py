"""Backbones, heads, prototypes and the EMA teacher (excb.model, excb.backbones)."""

from __future__ import annotations

import pytest
import torch

from excb.backbones import build_backbone
from excb.config import load_config
from excb.model import build_student_teacher, ema_update, parameter_groups


@pytest.mark.parametrize("name,channels,size,dim", [
    ("convnet", 1, 28, 64), ("resnet18_small", 1, 28, 512), ("resnet50", 3, 64, 2048), ("vit_s16", 3, 32, 384)])
def test_backbones_give_features(name: str, channels: int, size: int, dim: int) -> None:
    net = build_backbone(name, channels, convnet_widths=(16, 32, 64), image_size=size)
    assert net.out_dim == dim
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, channels, size, size)).shape == (2, dim)


def test_convnet_grid_pooling_keeps_layout() -> None:
    net = build_backbone("convnet", 1, convnet_widths=(8, 16), convnet_pool=2)
    assert net.out_dim == 16 * 4
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(3, 1, 28, 28)).shape == (3, 64)
        assert net(torch.randn(3, 1, 12, 12)).shape == (3, 64)  # local crops too


def test_vit_s16_is_the_paper_configuration_and_takes_local_crops() -> None:
    net = build_backbone("vit_s16", 3, image_size=224)
    vit = net.vit
    assert (vit.patch_size, vit.hidden_dim, len(vit.encoder.layers)) == (16, 384, 12)
    assert vit.encoder.layers[0].num_heads == 6
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 96, 96)).shape == (1, 384)  # interpolated position embeddings


def _cfg(*extra: str):
    return load_config(None, ["model.convnet_widths=[8,16]", "model.projector_hidden=32",
                              "model.predictor_hidden=32", "model.num_prototypes=10", *extra])


def test_student_scores_are_cosines_and_prototypes_learn_only_from_global_direct() -> None:
    student, teacher = build_student_teacher(_cfg())
    crops = [torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.randn(4, 1, 12, 12)]
    out = student(crops, num_global=2)
    assert len(out.direct) == 3 and len(out.predicted) == 3
    assert all(z.abs().max() <= 1 + 1e-5 for z in out.direct + out.predicted)
    for z in out.predicted + out.direct[2:]:  # predictor path and local crops: prototypes detached
        (g,) = torch.autograd.grad(z.sum(), student.prototypes.weight, allow_unused=True, retain_graph=True)
        assert g is None
    (g,) = torch.autograd.grad(out.direct[0].sum(), student.prototypes.weight, retain_graph=True)
    assert g.abs().sum() > 0
    assert teacher.predictor is None and not any(p.requires_grad for p in teacher.parameters())


def test_ema_update() -> None:
    student, teacher = build_student_teacher(_cfg())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    t_before = teacher.projector[0].weight.clone()
    s_w = student.projector[0].weight.detach()
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.projector[0].weight, 0.9 * t_before + 0.1 * s_w)
    ema_update(teacher, student, 1.0)  # m = 1 leaves the teacher unchanged
    torch.testing.assert_close(teacher.projector[0].weight, 0.9 * t_before + 0.1 * s_w)


def test_parameter_groups() -> None:
    student, _ = build_student_teacher(_cfg())
    groups = parameter_groups(student)
    assert groups["prototypes"] == [student.prototypes.weight]
    assert all(p.ndim <= 1 for p in groups["no_decay"])
    assert all(p.ndim > 1 for p in groups["regular"])
    total = sum(len(v) for v in groups.values())
    assert total == len(list(student.parameters()))
