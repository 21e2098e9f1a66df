"""Backbones, heads, prototypes and the EMA teacher (excb.method.model, excb.method.backbones)."""

from __future__ import annotations

import pytest
import torch

from excb.config import load_config
from excb.method.backbones import build_backbone
from excb.method.model import build_student_teacher, ema_update, parameter_groups


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


def test_channels_last_gradients_have_their_weights_strides() -> None:
    """DDP's gradient buckets take each parameter's strides and expect every gradient in them. With NCHW weights
    under NHWC crops, ResNet-18's 1×1 downsample convolutions got NHWC gradients ("Grad strides do not match
    bucket view strides", a copy per step); model.channels_last makes the weights NHWC as well."""
    student, _ = build_student_teacher(_cfg("model.backbone=resnet18_small", "data.channels=3",
                                            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"))
    crops = [torch.randn(4, 3, 28, 28), torch.randn(4, 3, 28, 28)]
    student(crops, num_global=2).direct[0].sum().backward()
    downsample = [p for n, p in student.named_parameters() if "downsample.0" in n]
    assert len(downsample) == 3  # the 1×1 convolutions whose layout is ambiguous
    assert [n for n, p in student.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()] == []


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


def _bn_head_cfg(*extra: str):
    return _cfg("model.projector_out=16", "model.head_norm=bn", *extra)


def _multicrop(b: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, 1, 28, 28, generator=gen) for _ in range(2)] + \
           [torch.randn(b, 1, 12, 12, generator=gen) for _ in range(6)]


def _cos(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).T


def test_projector_batch_norm_covers_all_crops_together() -> None:
    """model.projector_batching=joint (the released code): the backbone per crop size, then ONE projector pass
    over the concatenation of all 8 crops' features, so its BN statistics mix global and local crops."""
    torch.manual_seed(0)
    student, _ = build_student_teacher(_bn_head_cfg())
    crops = _multicrop()
    out = student(crops, num_global=2)
    with torch.no_grad():
        feats = torch.cat([student.backbone(torch.cat(crops[:2])), student.backbone(torch.cat(crops[2:]))])
        proj = student.projector(feats)  # joint BN statistics over 8 × 4 rows
        direct = _cos(proj, student.prototypes.weight).chunk(8)
        predicted = _cos(student.predictor(proj), student.prototypes.weight).chunk(8)
    for got, want in zip(out.direct + out.predicted, list(direct) + list(predicted)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the per-size ablation: BN statistics per crop size give other outputs
    per_size, _ = build_student_teacher(_bn_head_cfg("model.projector_batching=per_size"))
    per_size.load_state_dict(student.state_dict())
    other = per_size(crops, num_global=2)
    assert not torch.allclose(other.direct[0], out.direct[0], atol=1e-3)
    assert not torch.allclose(other.direct[5], out.direct[5], atol=1e-3)


def test_prototype_similarities_are_fp32_under_bf16_autocast() -> None:
    """Normalisation and z = <h/|h|, v/|v|> run in fp32 even inside bf16 autocast: in bf16, cosines near 0.7
    are 0.004 apart and the argmax ties among many prototypes."""
    from excb.method.model import Prototypes

    torch.manual_seed(0)
    protos = Prototypes(16, 4096)
    h = torch.randn(8, 16)
    want = _cos(h, protos.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = protos(h)
        bf16 = torch.nn.functional.linear(torch.nn.functional.normalize(h, dim=-1),
                                          torch.nn.functional.normalize(protos.weight, dim=-1))
    assert got.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (bf16.float() - want).abs().max() > 1e-3  # what the fp32 path avoids
    assert (bf16.float() == bf16.float().max(dim=1, keepdim=True).values).sum(dim=1).max() >= 1


@pytest.mark.parametrize("name", ["resnet50", "resnet18_small"])
def test_resnets_zero_init_the_last_bn_of_each_residual_branch(name: str) -> None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    net = build_backbone(name, 3)
    blocks = [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks
    for b in blocks:
        last = b.bn3 if isinstance(b, Bottleneck) else b.bn2
        assert torch.count_nonzero(last.weight) == 0
        assert torch.count_nonzero(b.bn1.weight - 1) == 0  # the other BNs start at γ = 1


def test_vit_is_initialised_like_the_released_vit() -> None:
    """Truncated normal (std 0.02) for every linear weight (q/k/v, attention output, MLP), zero biases, LayerNorm
    1/0, truncated-normal class token and position embeddings, PyTorch's default patch-embedding conv."""
    torch.manual_seed(0)
    vit = build_backbone("vit_s16", 3).vit
    linear = [m.weight.detach() for m in vit.modules() if isinstance(m, torch.nn.Linear)]
    qkv = [m.in_proj_weight.detach() for m in vit.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(qkv) == 12 and len(linear) == 12 * 3
    for w in linear + qkv:
        assert abs(float(w.std()) - 0.02) < 0.002 and float(w.abs().max()) < 0.02 * 6
    for m in vit.modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, torch.nn.MultiheadAttention):
            assert torch.count_nonzero(m.in_proj_bias) == 0
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0
    for p in (vit.class_token, vit.encoder.pos_embedding):
        assert abs(float(p.detach().std()) - 0.02) < 0.004
    bound = 1 / (3 * 16 * 16) ** 0.5  # kaiming_uniform(a=√5) of a fan-in 768 conv: U(±1/√fan_in)
    conv = vit.conv_proj.weight.detach()
    assert float(conv.abs().max()) <= bound and float(conv.std()) > bound / 3


def test_torchvision_backbones_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="no final nn.Linear"):
        build_backbone("torchvision:squeezenet1_0", 3)  # convolutional classifier
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        build_backbone("torchvision:resnet_nope", 3)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        build_backbone("torchvision:resnet18", 2)
    net = build_backbone("torchvision:resnet18", 1)  # one channel: repeated to three
    assert net.out_dim == 512
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_building_the_convnet_imports_no_torchvision() -> None:
    """Evaluation processes (feature actors, ``excb evaluate``) import the worker and evaluation modules and build
    a model without an optimizer; torchvision (and the ``torch._dynamo`` it pulls in, 1.3–2 s per process on 2
    cores) is imported only by the builders of backbones that use it."""
    import subprocess
    import sys

    code = ("import sys, excb.run.worker, excb.evaluation.evaluate; from excb.method.backbones import build_backbone;"
            " build_backbone('convnet', 1); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'"
            " or m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code_vit = "import sys; from excb.method.backbones import build_backbone; build_backbone('vit_s16', 3, image_size=32)"
    subprocess.run([sys.executable, "-c", code_vit], check=True)  # and the ViT builder still finds it
