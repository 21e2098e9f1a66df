"""The learner (excb.method.learner): training steps end to end on real images, k-means start, baselines through
the same step, seeding and exact resume from its state; without Ray."""

from __future__ import annotations

import io
import math

import pytest
import torch

from excb.config import load_config
from excb.data import load_fashion_mnist
from excb.method.baselines import CenteringBalancer
from excb.method.learner import ExcbLearner
from excb.method.step import NonFiniteLossError


def _learner(*overrides: str) -> tuple[ExcbLearner, torch.Tensor]:
    cfg = load_config(None, ["model.convnet_widths=[8,16]", "model.projector_hidden=64",
                             "model.predictor_hidden=64", "model.num_prototypes=32", "augment.num_local=2",
                             "train.epochs=2", "train.batch_size=64", "method.kmeans_samples=256",
                             "method.kmeans_iters=5", *overrides])
    x, _ = load_fashion_mnist("test")
    return ExcbLearner(cfg, steps_per_epoch=4), torch.from_numpy(x[:512, None].copy())


def test_steps_train_student_teacher_and_estimate() -> None:
    learner, images = _learner()
    counts = learner.init_prototypes(images.split(64), max_samples=256)
    assert counts.sum() == 256
    student, teacher = learner.student, learner.teacher
    torch.testing.assert_close(student.prototypes.weight, teacher.prototypes.weight)
    t0 = teacher.projector[0].weight.clone()
    s0 = student.projector[0].weight.clone()
    stats = [learner.step(images[i * 64:(i + 1) * 64]) for i in range(4)]
    assert learner.global_step == 4
    assert all(math.isfinite(s.loss) for s in stats)
    assert not torch.equal(student.projector[0].weight, s0) and not torch.equal(teacher.projector[0].weight, t0)
    assert not torch.allclose(learner.balancer.sizes, torch.full((32,), 1 / 32))
    torch.testing.assert_close(learner.balancer.sizes.sum(), torch.tensor(1.0))
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(learner.schedules.lr[3])


def test_channels_last_networks_compute_the_same_steps() -> None:
    """model.channels_last: every 4-D weight of student and teacher is NHWC like the crops (with one input channel
    an NHWC batch is also NCHW, and NCHW weights kept the whole network NCHW), and the steps compute what the
    all-NCHW network computes."""
    small = ["model.backbone=resnet18_small", "train.batch_size=8", "train.precision=fp32"]
    nhwc, images = _learner(*small)
    nchw, _ = _learner(*small, "model.channels_last=false")
    for net in (nhwc.student, nhwc.teacher):
        weights = [p for p in net.parameters() if p.ndim == 4]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in nchw.student.parameters()
                   if p.ndim == 4)
    for i in range(2):
        a, b = nhwc.step(images[i * 8:(i + 1) * 8]), nchw.step(images[i * 8:(i + 1) * 8])
        assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-4)
    for (name, p), q in zip(nhwc.teacher.named_parameters(), nchw.teacher.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=name)


def test_non_finite_loss_stops_with_clear_error() -> None:
    learner, images = _learner()
    with torch.no_grad():
        learner.student.projector[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="epoch 0, step 0"):
        learner.step(images[:64])


@pytest.mark.parametrize("name", ["centering", "sinkhorn", "none"])
def test_baselines_train_through_the_same_step(name: str) -> None:
    learner, images = _learner(f"method.balancer={name}")
    s0 = learner.student.projector[0].weight.clone()
    stats = [learner.step(images[i * 64:(i + 1) * 64]) for i in range(2)]
    assert all(math.isfinite(s.loss) for s in stats)
    assert not torch.equal(learner.student.projector[0].weight, s0)
    balancer = learner.balancer
    assert not torch.allclose(balancer.sizes, torch.full((32,), 1 / 32))  # health estimate tracked for all
    if isinstance(balancer, CenteringBalancer):
        assert balancer.center.abs().sum() > 0


def test_learner_is_seeded_and_resumes_exactly_from_its_state() -> None:
    """Two learners of one config start identical (torch seeded with train.seed); a learner restored from another's
    state_dict after 2 steps takes the same 3rd step (same loss, same weights), and the state holds only tensors
    and numbers, so it loads with weights_only=True."""
    a, images = _learner()
    b, _ = _learner()
    for (ka, va), (kb, vb) in zip(a.state_dict()["student"].items(), b.state_dict()["student"].items()):
        assert ka == kb and torch.equal(va, vb), ka
    for i in range(2):
        a.step(images[i * 64:(i + 1) * 64])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c, _ = _learner("train.seed=7")  # other initial weights: everything must come from the state
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert c.global_step == 2
    gen_a, gen_c = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    la = a.step(images[128:192], gen=gen_a).loss
    lc = c.step(images[128:192], gen=gen_c).loss
    assert la == lc
    for (k, va), vc in zip(a.teacher.state_dict().items(), c.teacher.state_dict().values()):
        assert torch.equal(va, vc), k
    torch.testing.assert_close(a.balancer.sizes, c.balancer.sizes, rtol=0, atol=0)


def test_precision_auto_is_bf16_only_where_the_device_supports_it() -> None:
    from excb.method.step import autocast_dtype_for, cpu_has_amx_bf16

    cpu = torch.device("cpu")
    assert autocast_dtype_for("fp32", cpu) is None
    assert autocast_dtype_for("bf16", cpu) is torch.bfloat16
    assert autocast_dtype_for("auto", cpu) is (torch.bfloat16 if cpu_has_amx_bf16() else None)  # CPU: AMX only
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        assert autocast_dtype_for("auto", torch.device("cuda")) is expected
    assert load_config(None, ["train.precision=auto"]).train.precision == "auto"
    with pytest.raises(Exception, match="train.precision"):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize("backbone", ["torchvision:convnext_tiny", "torchvision:mobilenet_v3_small"])
def test_any_torchvision_classifier_trains_as_the_backbone(backbone: str) -> None:
    """``model.backbone=torchvision:<model>``: the classifier's last Linear is removed, its feature size found
    from the model, one-channel images repeated to three; two steps move backbone, prototypes and teacher."""
    cfg = load_config(None, [f"model.backbone={backbone}", "model.projector_hidden=32", "model.projector_out=16",
                             "model.predictor_hidden=32", "model.num_prototypes=8", "augment.global_size=32",
                             "augment.local_size=32", "augment.num_local=1", "train.batch_size=4",
                             "train.epochs=1", "optim.warmup_epochs=0"])
    learner = ExcbLearner(cfg, steps_per_epoch=2)
    backbone_net = learner.student.backbone
    expected_dim = {"torchvision:convnext_tiny": 768, "torchvision:mobilenet_v3_small": 1024}[backbone]
    assert backbone_net.out_dim == expected_dim
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in backbone_net.modules())
    before = {k: v.clone() for k, v in learner.student.state_dict().items() if v.is_floating_point()}
    teacher_before = {k: v.clone() for k, v in learner.teacher.state_dict().items() if v.is_floating_point()}
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        assert math.isfinite(learner.step(images).loss)
    changed = [k for k, v in learner.student.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.net.") for k in changed) and any(k.startswith("prototypes.") for k in changed)
    assert any(not torch.equal(v, teacher_before[k]) for k, v in learner.teacher.state_dict().items()
               if k.startswith("backbone.") and k in teacher_before)


def test_amx_bf16_is_read_from_the_cpu_flags() -> None:
    from excb.method.step import cpu_has_amx_bf16

    sapphire = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    epyc = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"  # bf16 instructions, no AMX tiles
    assert cpu_has_amx_bf16(sapphire) and not cpu_has_amx_bf16(epyc)
    assert not cpu_has_amx_bf16("model name\t: has amx_bf16 in its name\n")  # only the flags line counts
    with open("/proc/cpuinfo", encoding="utf-8") as f:  # this machine: the answer follows its own flags
        assert cpu_has_amx_bf16() == (" amx_bf16" in f.read())
