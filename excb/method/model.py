"""Student and teacher networks: backbone → projector → L2-normalised projection scored against prototypes,
plus the student's predictor; the EMA teacher update.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from excb.config import ExcbConfig
from excb.method.backbones import build_backbone


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, norm: str) -> nn.Sequential:
    """Linear(in, h) [–BN]–act … –Linear(h, out); ``norm='bn'`` gives BN + ReLU, ``'none'`` gives GELU."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods.append(nn.Linear(d, hidden))
        if norm == "bn":
            mods += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        else:
            mods.append(nn.GELU())
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    net = nn.Sequential(*mods)
    net.apply(_init_linear)
    return net


class Prototypes(nn.Module):
    """K prototype directions v_k (weight-normalised linear layer, no bias, gain fixed at 1):

        z_k = cos(h, v_k) = <h/‖h‖, v_k/‖v_k‖>.
    """

    def __init__(self, dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_prototypes, dim) * 0.02)

    def forward(self, h: Tensor, detach: bool = False) -> Tensor:
        """z = normalise(h) · normalise(v)ᵀ, always in fp32 (autocast off): in bf16, cosines near 0.7 are spaced
        0.004 apart, about 0.1 logit at τ_t = 0.04, which ties the argmax among tens of thousands of prototypes."""
        v = self.weight.detach() if detach else self.weight
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(F.normalize(h.float(), dim=-1), F.normalize(v.float(), dim=-1))

    @torch.no_grad()
    def set_centres(self, centres: Tensor) -> None:
        self.weight.copy_(F.normalize(centres.to(self.weight), dim=-1))


def same_size_runs(crops: list[Tensor]) -> list[tuple[int, int]]:
    """Index ranges [i, j) of consecutive crops with the same height and width (e.g. the globals, then the locals)."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(crops):
        j = i + 1
        while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
            j += 1
        runs.append((i, j))
        i = j
    return runs


@dataclass
class ViewScores:
    """Similarities [B, K] per crop: ``direct`` (projector → prototypes) and ``predicted`` (predictor →
    detached prototypes; None for the teacher or with the predictor off)."""

    direct: list[Tensor]
    predicted: list[Tensor] | None


class ExcbNetwork(nn.Module):
    """backbone → projector → prototypes (and, for the student, predictor → detached prototypes)."""

    def __init__(self, cfg: ExcbConfig) -> None:
        super().__init__()
        m = cfg.model
        self.backbone = build_backbone(m.backbone, cfg.data.channels, convnet_widths=tuple(m.convnet_widths),
                                       convnet_pool=m.convnet_pool,
                                       image_size=cfg.augment.global_size, drop_path=m.drop_path)
        self.projector = mlp(self.backbone.out_dim, m.projector_hidden, m.projector_out, 3, m.head_norm)
        self.predictor: nn.Module | None = None
        if m.use_predictor:
            pred = mlp(m.projector_out, m.predictor_hidden, m.projector_out, 2, m.head_norm)
            self.predictor = nn.Sequential(nn.BatchNorm1d(m.projector_out), *pred)
        self.prototypes = Prototypes(m.projector_out, m.num_prototypes)
        self.channels_last = m.channels_last
        self.projector_batching = m.projector_batching
        if self.channels_last:
            self.to(memory_format=torch.channels_last)  # see _features: weights in the layout the inputs come in

    def _features(self, crops: list[Tensor]) -> list[Tensor]:
        """Backbone features [B_i, D] per crop; consecutive crops of equal size go through the backbone together.

        With ``model.channels_last`` the crops go in as NHWC and the network's 4-D weights are NHWC too (set in
        ``__init__``, kept by ``.to(device)``, ``deepcopy`` and ``load_state_dict``). With NCHW weights, a batch
        of one channel (NHWC and NCHW at once) ran the whole network NCHW: the Fashion-MNIST ConvNet's step took
        1.45× as long on a CPU (experiments/weight_layout_ab.py); with RGB inputs the 1×1 convolutions got NHWC
        gradients for NCHW weights, against the layout DDP's gradient buckets expect ("Grad strides do not match
        bucket view strides")."""
        feats: list[Tensor] = []
        for i, j in same_size_runs(crops):
            feats.extend(self.backbone_features(torch.cat(crops[i:j])).chunk(j - i))
        return feats

    def backbone_features(self, x: Tensor) -> Tensor:
        """Backbone features [B, D] of one batch [B, C, H, W], made NHWC first with ``model.channels_last`` (the
        layout of the weights, see :meth:`_features`): training and evaluation feed the backbone the same way."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def project(self, crops: list[Tensor]) -> list[Tensor]:
        """Raw projector outputs per crop.

        ``model.projector_batching=joint`` (the released code): the backbone runs once per crop size, the projector
        once on the concatenation of every crop's features, so its batch-norm statistics cover global and local
        crops together. ``per_size`` (an ablation): the projector runs per crop size, with statistics per size."""
        feats = self._features(crops)
        if self.projector_batching == "joint":
            return list(self.projector(torch.cat(feats)).split([f.shape[0] for f in feats]))
        return [y for i, j in same_size_runs(crops) for y in self.projector(torch.cat(feats[i:j])).chunk(j - i)]

    def forward(self, crops: list[Tensor], num_global: int = 2) -> ViewScores:
        """Scores every crop; only the first ``num_global`` crops' direct scores train the prototypes."""
        ys = self.project(crops)
        direct = [self.prototypes(y, detach=i >= num_global) for i, y in enumerate(ys)]
        predicted = None
        if self.predictor is not None:
            q = self.predictor(torch.cat(ys)).split([y.shape[0] for y in ys])
            predicted = [self.prototypes(qi, detach=True) for qi in q]
        return ViewScores(direct=direct, predicted=predicted)


def build_student_teacher(cfg: ExcbConfig) -> tuple[ExcbNetwork, ExcbNetwork]:
    """The student and a teacher copy without the predictor (nor drop-path), whose parameters get no gradients."""
    student = ExcbNetwork(cfg)
    teacher = copy.deepcopy(student)
    teacher.predictor = None
    if cfg.model.drop_path > 0:  # a ViT (build_backbone refuses drop_path for the others)
        from excb.method.vit import set_drop_path

        set_drop_path(teacher.backbone, 0.0)  # stochastic depth is for the student only
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s for every teacher parameter (BN buffers are not averaged)."""
    s_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, p_t in teacher.named_parameters():
        t_list.append(p_t)
        s_list.append(s_params[name].detach())
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


def compile_backbones(*nets: ExcbNetwork) -> None:
    """``torch.compile`` each network's backbone in place (``nn.Module.compile``): parameter names, state dicts,
    the EMA update and checkpoints are unchanged. Call it before DDP wraps the student (``prepare_model``), as
    PyTorch advises (compile the inner module, not the DDP wrapper). Heads, loss and balancing stay eager."""
    for net in nets:
        net.backbone.compile()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def parameter_groups(student: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split parameters into ``regular`` (weight decay), ``no_decay`` (biases, 1-D) and ``prototypes``."""
    groups: dict[str, list[nn.Parameter]] = {"regular": [], "no_decay": [], "prototypes": []}
    for name, p in unwrap(student).named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("prototypes."):
            groups["prototypes"].append(p)
        elif p.ndim <= 1 or name.endswith(".bias"):
            groups["no_decay"].append(p)
        else:
            groups["regular"].append(p)
    return groups
