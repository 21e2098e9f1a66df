"""The learner: every part of ExCB training in one module, assembled once.

:class:`ExcbLearner` owns the student, the EMA teacher, the balancer (ExCB's size estimate or a baseline), the
optimiser, the multi-crop views and the per-step schedules, and runs one optimisation step
(:func:`excb.method.step.train_step`). The Ray Train worker, ``excb bench``, the experiments and the tests all
build it the same way; a distributed worker passes two hooks: ``global_batchnorm`` (batch statistics over every
rank's batch) and ``wrap_student`` (DDP, for example ``ray.train.torch.prepare_model``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from excb.config import ExcbConfig
from excb.method.augment import MultiCropAugment
from excb.method.baselines import build_balancer
from excb.method.kmeans import spherical_kmeans
from excb.method.model import build_student_teacher, compile_backbones, unwrap
from excb.method.schedules import build_schedules
from excb.method.step import (
    PhaseTimer,
    StepStats,
    autocast_dtype_for,
    build_optimizer,
    train_step,
)
from excb.method.syncbn import convert_global_batchnorm

ViewFunction = Callable[[Tensor, float, torch.Generator, Tensor | None], list[Tensor]]


class ExcbLearner(nn.Module):
    """Student, teacher, balancer, optimiser, views and schedules of one training process.

    Built from ``cfg.model`` (networks, K), ``cfg.method`` (balancer, temperatures, EMA, k-means), ``cfg.optim``
    (optimiser and lr / wd schedules), ``cfg.augment`` with ``cfg.data.mean``/``std`` (views), and of
    ``cfg.train`` the epochs, seed, precision and ``compile``. In order: torch and numpy seeded with
    ``train.seed``; networks built; BN layers made global (hook); backbones compiled (``train.compile``); teacher
    moved to ``device``; student wrapped (hook, which must move it to ``device``) or moved; then the optimiser
    over the (wrapped) student's parameters, and schedules for ``steps_per_epoch`` steps with peak lr
    ``optim.lr × lr_scale``.

    ``global_step`` is the next optimiser step s (schedules are read at s); :meth:`step` advances it.
    """

    def __init__(self, cfg: ExcbConfig, steps_per_epoch: int, *, device: torch.device | None = None,
                 lr_scale: float = 1.0, global_batchnorm: bool = False,
                 wrap_student: Callable[[nn.Module], nn.Module] | None = None) -> None:
        super().__init__()
        device = device or torch.device("cpu")
        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)
        student, teacher = build_student_teacher(cfg)
        if global_batchnorm:  # batch statistics over the global batch, for the student and the teacher alike
            student = convert_global_batchnorm(student, device.type)
            teacher = convert_global_batchnorm(teacher, device.type)
        if cfg.train.compile:  # in place and before DDP: DDP wraps the compiled module
            compile_backbones(student, teacher)
        self.teacher = teacher.to(device)
        self.student = wrap_student(student) if wrap_student is not None else student.to(device)
        self.balancer = build_balancer(cfg).to(device)
        self.optimizer = build_optimizer(cfg, self.student)
        self.schedules = build_schedules(cfg, steps_per_epoch, lr_scale=lr_scale)
        self.augment: MultiCropAugment | ViewFunction = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
        self.autocast_dtype = autocast_dtype_for(cfg.train.precision, device)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)  # views, when step() is given no generator
        self.global_step = 0

    @property
    def network(self) -> nn.Module:
        """The student network without its DDP wrapper."""
        return unwrap(self.student)

    def step(self, images: Tensor, epoch: int = 0, gen: torch.Generator | None = None,
             valid_hw: Tensor | None = None, timer: PhaseTimer | None = None,
             check_finite: bool = True) -> StepStats:
        """One optimisation step on uint8 ``images`` [B, C, H, W] at ``global_step`` in ``epoch`` (views drawn
        with ``gen``, or the learner's own generator); see :func:`excb.method.step.train_step`."""
        stats = train_step(self.cfg, self.student, self.teacher, self.balancer, self.optimizer, self.augment,
                           self.schedules, images, self.global_step, epoch, gen or self.gen,
                           autocast_dtype=self.autocast_dtype, timer=timer, valid_hw=valid_hw,
                           check_finite=check_finite)
        self.global_step += 1
        return stats

    @torch.no_grad()
    def init_prototypes(self, batches: Iterable[Tensor | tuple[Tensor, Tensor | None]], max_samples: int,
                        gen: torch.Generator | None = None) -> Tensor:
        """Spherical k-means over the (random-init) teacher's L2-normalised projector outputs of one global view of
        up to ``max_samples`` images on this rank (k-means itself is global: every rank gets the same centres),
        copied into teacher and student prototypes. ``batches`` yields uint8 images, or tuples whose first two items
        are the images and their valid_hw or None (as :class:`excb.run.worker.EpochFeed` yields). Returns the final
        cluster counts."""
        gen = gen or self.gen
        feats: list[Tensor] = []
        n = 0
        for batch in batches:
            images, valid_hw = (batch, None) if isinstance(batch, Tensor) else batch[:2]
            view = self.augment(images, float(self.cfg.augment.crop_min_start), gen, valid_hw)[0]
            feats.append(torch.nn.functional.normalize(self.teacher.project([view])[0].float(), dim=1))
            n += view.shape[0]
            if n >= max_samples:
                break
        x = torch.cat(feats)[:max_samples]
        centres, counts = spherical_kmeans(x, self.cfg.model.num_prototypes, self.cfg.method.kmeans_iters,
                                           seed=self.cfg.train.seed)
        self.teacher.prototypes.set_centres(centres)
        self.network.prototypes.set_centres(centres)
        return counts

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The training state as plain tensors and numbers: student (unwrapped), teacher, balancer, optimiser and
        the next step; loadable with ``torch.load(..., weights_only=True)``."""
        return {"student": self.network.state_dict(), "teacher": self.teacher.state_dict(),
                "balancer": self.balancer.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore what :meth:`state_dict` wrote (extra keys, such as a checkpoint's epoch and history, ignored)."""
        self.network.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.balancer.load_state_dict(state["balancer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state["step"])
