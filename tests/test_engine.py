"""One training step end to end on real images (excb.engine), without Ray."""

from __future__ import annotations

import pytest
import torch

from excb.augment import MultiCropAugment
from excb.baselines import CenteringBalancer, build_balancer
from excb.config import load_config
from excb.data import load_fashion_mnist
from excb.engine import NonFiniteLossError, build_optimizer, init_prototypes_kmeans, train_step
from excb.model import build_student_teacher
from excb.schedules import build_schedules


def _setup(*overrides: str):
    cfg = load_config(None, ["model.convnet_widths=[8,16]", "model.projector_hidden=64",
                             "model.predictor_hidden=64", "model.num_prototypes=32", "augment.num_local=2",
                             "train.epochs=2", "train.batch_size=64", "method.kmeans_samples=256",
                             "method.kmeans_iters=5", *overrides])
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    balancer = build_balancer(cfg)
    opt = build_optimizer(cfg, student)
    aug = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    sched = build_schedules(cfg, steps_per_epoch=4)
    x, _ = load_fashion_mnist("test")
    images = torch.from_numpy(x[:512, None].copy())
    return cfg, student, teacher, balancer, opt, aug, sched, images


def test_steps_train_student_teacher_and_estimate() -> None:
    cfg, student, teacher, balancer, opt, aug, sched, images = _setup()
    gen = torch.Generator().manual_seed(0)
    counts = init_prototypes_kmeans(cfg, student, teacher, images.split(64), aug, gen, max_samples=256)
    assert counts.sum() == 256
    torch.testing.assert_close(student.prototypes.weight, teacher.prototypes.weight)
    t0 = teacher.projector[0].weight.clone()
    s0 = student.projector[0].weight.clone()
    stats = [train_step(cfg, student, teacher, balancer, opt, aug, sched, images[i * 64:(i + 1) * 64], i, 0, gen)
             for i in range(4)]
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in stats)
    assert not torch.equal(student.projector[0].weight, s0) and not torch.equal(teacher.projector[0].weight, t0)
    assert not torch.allclose(balancer.sizes, torch.full((32,), 1 / 32))
    torch.testing.assert_close(balancer.sizes.sum(), torch.tensor(1.0))
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr[3])


def test_non_finite_loss_stops_with_clear_error() -> None:
    cfg, student, teacher, balancer, opt, aug, sched, images = _setup()
    with torch.no_grad():
        student.projector[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="epoch 0, step 0"):
        train_step(cfg, student, teacher, balancer, opt, aug, sched, images[:64], 0, 0, torch.Generator())


@pytest.mark.parametrize("name", ["centering", "sinkhorn", "none"])
def test_baselines_train_through_the_same_step(name: str) -> None:
    cfg, student, teacher, balancer, opt, aug, sched, images = _setup(f"method.balancer={name}")
    gen = torch.Generator().manual_seed(0)
    s0 = student.projector[0].weight.clone()
    stats = [train_step(cfg, student, teacher, balancer, opt, aug, sched, images[i * 64:(i + 1) * 64], i, 0, gen)
             for i in range(2)]
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in stats)
    assert not torch.equal(student.projector[0].weight, s0)
    assert not torch.allclose(balancer.sizes, torch.full((32,), 1 / 32))  # health estimate tracked for all
    if isinstance(balancer, CenteringBalancer):
        assert balancer.center.abs().sum() > 0


def test_precision_auto_is_bf16_only_where_the_device_supports_it() -> None:
    from excb.engine import autocast_dtype_for

    cpu = torch.device("cpu")
    assert autocast_dtype_for("fp32", cpu) is None
    assert autocast_dtype_for("bf16", cpu) is torch.bfloat16
    assert autocast_dtype_for("auto", cpu) is None  # CPU: fp32
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        assert autocast_dtype_for("auto", torch.device("cuda")) is expected
    assert load_config(None, ["train.precision=auto"]).train.precision == "auto"
    with pytest.raises(Exception, match="train.precision"):
        load_config(None, ["train.precision=fp16"])
