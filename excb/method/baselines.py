"""The balancing methods ExCB replaces, behind the same :class:`~excb.method.balancing.Balancer` interface, and the
registry that builds the one ``method.balancer`` names.

- ``centering`` — DINO (Caron et al., 2021): the teacher's logits are centred by an EMA of their batch mean,
  p = softmax((z − c) / τ_t), c ← m_c·c + (1 − m_c)·mean_batch(z)  (mean over all ranks).
- ``sinkhorn`` — SwAV (Caron et al., 2020): targets are the batch's equipartitioned soft assignments from
  Sinkhorn-Knopp on Q = exp(z / ε)ᵀ, normalised over the global batch (sums all-reduced over ranks).
- ``none`` — no balancing: p = softmax(z / τ_t).

All of them track the hard-assignment size estimate for the health metrics (it only steers ExCB).
"""

from __future__ import annotations

import torch
from torch import Tensor

from excb.config import ExcbConfig
from excb.distributed import all_reduce_mean, all_reduce_sum, world_size
from excb.method.balancing import Balancer, ClusterBalancer
from excb.registry import Registry


class NoBalancer(Balancer):
    """p = softmax(z / τ_t): the teacher's own distribution, nothing done against collapse."""

    @torch.no_grad()
    def targets(self, z: Tensor, teacher_temp: float) -> Tensor:
        self._check(z)
        return torch.softmax(z / teacher_temp, dim=-1)


class CenteringBalancer(Balancer):
    """DINO-style centering (their eq. 4 and the centre update):

        p = softmax((z − c) / τ_t),   c ← m_c·c + (1 − m_c)·(1/N)·Σ_i z_i,

    where the batch mean runs over all global views of the global batch (all-reduce mean), computed from the
    raw teacher similarities after the loss. ``c`` starts at zero and is checkpointed with the run."""

    center: Tensor

    def __init__(self, num_clusters: int, *, center_momentum: float = 0.9, momentum: float = 0.999) -> None:
        super().__init__(num_clusters, momentum=momentum)
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}")
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(num_clusters))

    @torch.no_grad()
    def targets(self, z: Tensor, teacher_temp: float) -> Tensor:
        self._check(z)
        return torch.softmax((z - self.center.to(z)) / teacher_temp, dim=-1)

    @torch.no_grad()
    def observe(self, z: Tensor, p: Tensor) -> None:
        self._check(z)
        batch_mean = all_reduce_mean(z.detach().float().reshape(-1, self.num_clusters).mean(dim=0))
        self.center.mul_(self.center_momentum).add_(batch_mean.to(self.center), alpha=1.0 - self.center_momentum)
        self.update(p)

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, center_momentum={self.center_momentum}"


@torch.no_grad()
def sinkhorn_knopp(z: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's (distributed) Sinkhorn-Knopp on similarities z [B, K] of this rank's batch; returns codes [B, K].

    With Q = exp(z / ε)ᵀ [K, B_total] over the global batch of B_total = B·world samples, Q ← Q / ΣQ, then
    ``iterations`` times: rows ← rows / (row sum · K) (each prototype gets 1/K of the mass), columns ←
    columns / (column sum · B_total) (each sample 1/B_total); finally columns are scaled to sum to 1 per sample.
    Row sums and the total are all-reduced, so every rank solves the same global problem on its own columns.
    The constant shift by max z = 1 (cosines) cancels in the normalisation and keeps exp finite.
    """
    k = z.shape[-1]
    q = torch.exp((z.float() - 1.0) / epsilon).t()  # [K, B]
    b_total = q.shape[1] * world_size()
    q /= all_reduce_sum(q.sum()).clamp_min(1e-30)
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= b_total
    q *= b_total
    return q.t()


class SinkhornBalancer(Balancer):
    """SwAV-style targets: p = SinkhornKnopp(z) over the global batch (see :func:`sinkhorn_knopp`). The
    teacher temperature is not used: ε plays its role."""

    def __init__(self, num_clusters: int, *, epsilon: float = 0.05, iterations: int = 3,
                 momentum: float = 0.999) -> None:
        super().__init__(num_clusters, momentum=momentum)
        if epsilon <= 0 or iterations < 1:
            raise ValueError(f"need epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
        self.epsilon = epsilon
        self.iterations = iterations

    @torch.no_grad()
    def targets(self, z: Tensor, teacher_temp: float) -> Tensor:
        self._check(z)
        return sinkhorn_knopp(z, self.epsilon, self.iterations).to(z.dtype)

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, epsilon={self.epsilon}, iterations={self.iterations}"


BALANCER_REGISTRY: Registry[Balancer] = Registry("balancer")
BALANCER_REGISTRY.register("excb")(ClusterBalancer)
BALANCER_REGISTRY.register("centering")(CenteringBalancer)
BALANCER_REGISTRY.register("sinkhorn")(SinkhornBalancer)
BALANCER_REGISTRY.register("none")(NoBalancer)


def build_balancer(cfg: ExcbConfig) -> Balancer:
    """The balancer ``method.balancer`` names, sized for the model's K, offered every balancing option of the
    config by keyword (each takes those it has: ``momentum`` = ``method.balance_momentum`` for all,
    ``argmax_boost`` for ExCB, ``center_momentum`` for centering, ``epsilon``/``iterations`` for Sinkhorn)."""
    me = cfg.method
    return BALANCER_REGISTRY.build(me.balancer, num_clusters=cfg.model.num_prototypes,
                                   momentum=me.balance_momentum, argmax_boost=me.argmax_boost,
                                   center_momentum=me.center_momentum, epsilon=me.sinkhorn_epsilon,
                                   iterations=me.sinkhorn_iters)
