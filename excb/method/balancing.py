"""ExCB's explicit cluster balancing: a running cluster-size estimate and the operator that uses it, behind the
:class:`Balancer` interface the baselines (``excb.method.baselines``) share.

Usage::

    balancer = ClusterBalancer(num_clusters=1024, momentum=0.999)
    z_teacher = teacher_similarities            # [N, K] cosines in [-1, 1] of one global view
    p = balancer.targets(z_teacher, 0.04)       # softmax(B(z) / τ_t)
    loss = ...                                  # cross-entropy against p
    balancer.observe(z_teacher, p)              # after the loss: EMA of the hard-assignment histogram
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from excb.distributed import all_reduce_mean


def balance_similarities(z: Tensor, sizes: Tensor, argmax_boost: float = 1.01, eps: float = 1e-8) -> Tensor:
    """Apply the ExCB operator B to cosine similarities ``z`` [N, K] given relative cluster sizes ``sizes`` [K].

    With c_k = K·s_k / Σ_j s_j, lower_k = min(c_k, 1) and higher_k = min(1/c_k, 1):

        z'  = 1 − (1 − z)·lower          (under-sized clusters: cosine distance shrinks)
        z'' = (z' + 1)·higher − 1        (over-sized clusters: similarity measured from −1 shrinks)

    then the row-wise argmax entry of z'' is multiplied by ``argmax_boost`` and the result clamped to [−1, 1].
    ``eps`` keeps a zero size from giving a zero factor.
    """
    k = z.shape[-1]
    s = sizes.to(dtype=z.dtype, device=z.device)
    c = k * s / s.sum().clamp_min(eps)
    lower = c.clamp(min=eps, max=1.0)
    higher = (1.0 / c.clamp_min(eps)).clamp(max=1.0)
    # Both steps are affine in z per cluster, so one fused pass over [N, K] does them:
    # z'' = ((1 − (1 − z)·lower) + 1)·higher − 1 = β·z + α,  β = lower·higher,  α = (2 − lower)·higher − 1.
    z2 = torch.addcmul((2.0 - lower) * higher - 1.0, z, lower * higher)
    if argmax_boost != 1.0:
        idx = z2.argmax(dim=-1, keepdim=True)
        z2.scatter_(-1, idx, z2.gather(-1, idx) * argmax_boost)
    return z2.clamp_(-1.0, 1.0)


def assignment_histogram(p: Tensor) -> Tensor:
    """Fraction of rows of ``p`` [..., K] whose argmax is each cluster: mean over leading dims of onehot(argmax p)."""
    k = p.shape[-1]
    labels = p.detach().reshape(-1, k).argmax(dim=-1)
    counts = torch.bincount(labels, minlength=k).to(torch.float32)
    return counts / max(labels.numel(), 1)


class Balancer(nn.Module):
    """How the teacher's similarities z [N, K] of one global view become targets p [N, K], and what state that
    keeps across steps. Every balancer also tracks ``sizes``, the EMA of the hard-assignment histogram

        s ← m·s + (1 − m)·mean(onehot(argmax p))   (histogram averaged over ranks),

    which ExCB uses in its operator and the others keep for the cluster-health metrics only.

    The training step calls ``targets`` once per global view (no gradient), then ``observe`` once with the
    concatenated z and p of all global views, after the loss.
    """

    sizes: Tensor

    def __init__(self, num_clusters: int, *, momentum: float = 0.999) -> None:
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_clusters = num_clusters
        self.momentum = momentum
        self.register_buffer("sizes", torch.full((num_clusters,), 1.0 / num_clusters))

    def _check(self, t: Tensor) -> None:
        if t.shape[-1] != self.num_clusters:
            raise ValueError(f"expected {self.num_clusters} clusters in the last dim, got shape {tuple(t.shape)}")

    def targets(self, z: Tensor, teacher_temp: float) -> Tensor:
        """Teacher targets p [N, K] from similarities z [N, K] of one view."""
        raise NotImplementedError

    @torch.no_grad()
    def observe(self, z: Tensor, p: Tensor) -> None:
        """After the loss: update the state from this step's similarities and targets (all global views)."""
        self.update(p)

    @torch.no_grad()
    def update(self, p: Tensor) -> Tensor:
        """EMA of the hard-assignment histogram of teacher probabilities ``p`` [..., K]; returns the histogram."""
        self._check(p)
        hist = all_reduce_mean(assignment_histogram(p).to(self.sizes.device))
        self.sizes.mul_(self.momentum).add_(hist.to(self.sizes.dtype), alpha=1.0 - self.momentum)
        return hist


class ClusterBalancer(Balancer):
    """ExCB: running relative cluster sizes ``sizes`` (uniform at start) and the balancing operator B.

    ``targets`` is p = softmax(B(z) / τ_t); ``update`` implements s ← m·s + (1 − m)·mean(onehot(argmax p)), the
    histogram averaged across ranks (all-reduce mean) when torch.distributed is initialised, so every rank holds
    the same estimate.
    """

    def __init__(self, num_clusters: int, *, momentum: float = 0.999, argmax_boost: float = 1.01) -> None:
        super().__init__(num_clusters, momentum=momentum)
        self.argmax_boost = argmax_boost

    @torch.no_grad()
    def balance(self, z: Tensor) -> Tensor:
        """z [N, K] cosine similarities → balanced similarities (operator B, ×boost on the argmax, clamp)."""
        self._check(z)
        return balance_similarities(z, self.sizes, self.argmax_boost)

    @torch.no_grad()
    def targets(self, z: Tensor, teacher_temp: float) -> Tensor:
        """p = softmax(B(z) / τ_t)."""
        return torch.softmax(self.balance(z).div_(teacher_temp), dim=-1)

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, momentum={self.momentum}, argmax_boost={self.argmax_boost}"
