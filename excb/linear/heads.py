"""Linear heads on frozen features, trained side by side at their own learning rates, and their scores.

Every head is ``y = W f + b`` on the backbone feature f (no normalisation), initialised W ~ N(0, 0.01²), b = 0
(all heads start from the same draw). The loss is Σ_h CE(W_h f + b_h, y); head h's parameters are in their own
SGD group with learning rate lr_h · ½(1 + cos(π t / T)) at step t of T (cosine to 0), momentum μ and weight decay λ
(on W and b, as torch's SGD applies it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearHeads(nn.Module):
    """``len(lrs)`` linear classifiers ``dim → num_classes``; ``forward`` returns logits [H, B, C]."""

    def __init__(self, dim: int, num_classes: int, lrs: list[float], seed: int = 0) -> None:
        super().__init__()
        if not lrs:
            raise ValueError("no learning rate left for the heads")
        self.lrs = list(lrs)
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(num_classes, dim, generator=gen) * 0.01
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in lrs)
        with torch.no_grad():
            for head in self.heads:
                head.weight.copy_(weight)
                head.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return torch.stack([head(features) for head in self.heads])

    @staticmethod
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Σ_h mean_b CE(logits[h, b], labels[b])."""
        h, b, c = logits.shape
        return F.cross_entropy(logits.reshape(h * b, c), labels.repeat(h), reduction="sum") / b

    def optimizer(self, momentum: float, weight_decay: float) -> torch.optim.SGD:
        """SGD with one parameter group per head at its base lr (``initial_lr``; :func:`set_lrs` applies the
        schedule)."""
        groups = [{"params": list(head.parameters()), "lr": lr, "initial_lr": lr}
                  for head, lr in zip(self.heads, self.lrs, strict=True)]
        return torch.optim.SGD(groups, lr=self.lrs[0], momentum=momentum, weight_decay=weight_decay)


def set_lrs(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """lr of every group ← its ``initial_lr`` · factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def cosine_factor(step: int, total: int) -> float:
    """½(1 + cos(π t / T)), from 1 at t = 0 to 0 at t = T."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@torch.no_grad()
def topk_correct(logits: Tensor, labels: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """Per head, how many rows have the label first (top-1) and among the ``k`` largest logits (top-k): two
    float64 tensors [H]."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # [H, B, k]
    hit = top == labels.view(1, -1, 1)
    return hit[..., 0].sum(1).double(), hit.any(-1).sum(1).double()
