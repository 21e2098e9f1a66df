"""One ExCB optimisation step, shared by the Ray Train worker loop and plain-PyTorch benchmarks.

Following one batch: uint8 images → multi-crop views → teacher similarities of the global views → balanced
targets p = softmax(B(z_t)/τ_t) → student log-probabilities → loss over view pairs → optimiser step with the
step's lr / wd → EMA teacher update → size-estimate update from argmax p. ``method.balancer`` swaps the
balanced targets for a baseline's (DINO centering, SwAV Sinkhorn, none; see excb.method.baselines).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from excb.config import ExcbConfig
from excb.method.augment import MultiCropAugment
from excb.method.balancing import Balancer
from excb.method.loss import excb_loss
from excb.method.model import (
    ExcbNetwork,
    ema_update,
    parameter_groups,
    unwrap,
)
from excb.method.schedules import Schedules


def cpu_has_amx_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 on AMX tiles (Intel Sapphire Rapids and later: the ``amx_bf16`` flag in
    ``/proc/cpuinfo``, or in ``cpuinfo`` where given), where oneDNN runs bf16 convolutions and matrix products
    faster than fp32. False where the flags cannot be read (not Linux)."""
    if cpuinfo is None:
        return _this_cpu_has_amx_bf16()
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in cpuinfo.splitlines())


@functools.cache
def _this_cpu_has_amx_bf16() -> bool:
    """``/proc/cpuinfo`` read once per process: the linear probe asks for its autocast dtype on every batch."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return cpu_has_amx_bf16(f.read())
    except OSError:
        return False


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``: bf16, None (fp32), or for ``auto`` bf16 where the
    device computes it fast — CUDA with bf16 support, or a CPU with AMX-BF16 (the Fashion-MNIST ConvNet step at
    batch 256 ran 1.4–1.9× as fast as in fp32 on one such Xeon core) — and fp32 elsewhere (CPU autocast without
    AMX was slower than fp32 where it was measured)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision == "auto" and device.type == "cpu" and cpu_has_amx_bf16():
        return torch.bfloat16
    return None


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops and the last good checkpoint is kept."""


def build_optimizer(cfg: ExcbConfig, student: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over three groups: regular (wd), no_decay (biases, 1-D), prototypes (proto wd)."""
    groups = [{"params": ps, "name": name, "weight_decay": 0.0}
              for name, ps in parameter_groups(student).items() if ps]
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.999))


def apply_schedule(optimizer: torch.optim.Optimizer, schedules: Schedules, step: int) -> None:
    """Set the step's lr and weight decays on every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = float(schedules.lr[step])
        if g["name"] == "regular":
            g["weight_decay"] = float(schedules.weight_decay[step])
        elif g["name"] == "prototypes":
            g["weight_decay"] = float(schedules.prototype_weight_decay[step])


class PhaseTimer:
    """Wall time per phase of a training step. It synchronises the device at every phase boundary, which costs a
    little throughput: use it to profile (``excb bench``, experiments), not in training runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] += time.perf_counter() - t0


@contextlib.contextmanager
def _untimed(name: str) -> Iterator[None]:
    yield


STAT_KEYS = ("loss", "teacher_confidence", "unique_targets", "changed_by_balancing")


@dataclass
class StepStats:
    """One step's statistics as 0-d tensors on the training device. Reading one (``float(stats.loss)``) waits for
    the device to finish the step, so the training loop keeps them there (:class:`excb.run.stat_sums.StatSums`)
    and reads them once per logging interval."""

    loss: Tensor
    teacher_confidence: Tensor  # mean_i max_k p_ik
    unique_targets: Tensor  # |{argmax_k p_ik}|: distinct teacher argmax labels in the batch (this rank)
    changed_by_balancing: Tensor  # mean_i [argmax_k z_ik ≠ argmax_k p_ik]: targets whose argmax the operator changed

    def vector(self) -> Tensor:
        """The four statistics in :data:`STAT_KEYS` order, float64 [4], on the device (no host sync)."""
        return torch.stack([getattr(self, k).detach().double() for k in STAT_KEYS])


def teacher_targets(teacher: ExcbNetwork, balancer: Balancer, global_views: list[Tensor],
                    teacher_temp: float, phase: Any = _untimed) -> tuple[list[Tensor], Tensor, Tensor]:
    """p_i = balancer.targets(z_t,i, τ_t) for each global view i (ExCB: softmax(B(z_t,i) / τ_t)); also the
    concatenated teacher similarities z_t and the fraction of rows whose argmax the balancer changed (a 0-d
    tensor on the device)."""
    with torch.no_grad():
        with phase("teacher"):
            z = torch.cat(teacher(global_views, num_global=len(global_views)).direct).float()
        with phase("balance"):
            targets = [balancer.targets(zi, teacher_temp) for zi in z.chunk(len(global_views))]
        changed = (z.argmax(-1) != torch.cat(targets).argmax(-1)).float().mean()
    return targets, z, changed


def train_step(cfg: ExcbConfig, student: nn.Module, teacher: ExcbNetwork, balancer: Balancer,
               optimizer: torch.optim.Optimizer, augment: MultiCropAugment, schedules: Schedules,
               images: Tensor, step: int, epoch: int, gen: torch.Generator,
               autocast_dtype: torch.dtype | None = None, timer: PhaseTimer | None = None,
               valid_hw: Tensor | None = None, check_finite: bool = True) -> StepStats:
    """Run one optimisation step on a uint8 batch [B, C, H, W] at global step ``step`` (``valid_hw``: each image's
    size in its padded canvas, crops drawn inside it; None = images fill their canvas).

    ``check_finite`` raises :class:`NonFiniteLossError` before the update when the loss is NaN or infinite, which
    reads the loss back to the host; the training loop passes False and checks the losses of a whole logging
    interval at once (:meth:`excb.run.stat_sums.StatSums.read`), before any checkpoint is written. Nothing in
    this function waits for the device otherwise.

    ``timer`` (optional) records the time of each phase: views, teacher, balance (operator B and the softmax),
    student, loss_backward, optimizer, ema, estimate (the size-estimate update)."""
    phase = timer or _untimed
    with phase("views"):
        views = augment(images, float(schedules.crop_min_scale[epoch]), gen, valid_hw)
    apply_schedule(optimizer, schedules, step)
    device_type = images.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        targets, z_teacher, changed = teacher_targets(teacher, balancer, views[:2], cfg.method.teacher_temp, phase)
        with phase("student"):
            out = student(views, num_global=2)
        with phase("loss_backward"):
            loss = excb_loss(targets, out.direct, out.predicted, cfg.method.student_temp)
    if check_finite and not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch}, step {step}")
    with phase("loss_backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimizer"):
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
        optimizer.step()
    with phase("ema"):
        ema_update(teacher, unwrap(student), float(schedules.ema_momentum[step]))
    with phase("estimate"):
        p = torch.cat(targets)
        balancer.observe(z_teacher, p)
        used = torch.zeros(p.shape[-1], device=p.device).index_fill_(0, p.argmax(-1), 1.0).sum()
    return StepStats(loss=loss.detach(), teacher_confidence=p.max(dim=-1).values.mean(), unique_targets=used,
                     changed_by_balancing=changed)
