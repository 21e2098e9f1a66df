"""Spherical k-means for prototype initialisation, data-parallel across ranks.

Features stay on their rank; only the per-cluster sums and counts are all-reduced, so every rank ends with the
same centres.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from excb.distributed import is_distributed


def _assign(x: Tensor, centres: Tensor, chunk: int = 8192) -> Tensor:
    """E-step: argmax_k <x_n, c_k> for unit vectors, computed in row chunks to bound memory."""
    return torch.cat([(x[i:i + chunk] @ centres.T).argmax(dim=1) for i in range(0, x.shape[0], chunk)])


def _initial_centres(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k distinct random local samples (repeated when there are fewer), broadcast from rank 0."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=generator)[:k]
    if idx.numel() < k:
        idx = torch.cat([idx, torch.randint(n, (k - idx.numel(),), generator=generator)])
    centres = x[idx.to(x.device)].clone()
    if is_distributed():
        dist.broadcast(centres, src=0)
    return centres


def spherical_kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Cluster unit vectors ``x`` [N, D] into ``k`` centres on the sphere; returns (centres [k, D], counts [k]).

    Initialise from random samples; then ``iters`` times: assign a_n = argmax_k <x_n, c_k>;
    c_k ← normalise(Σ_{a_n = k} x_n) with sums and counts all-reduced across ranks; empty clusters keep their
    old centre.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty [N, D] feature matrix, got shape {tuple(x.shape)}")
    x = F.normalize(x.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centres = _initial_centres(x, k, gen)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        labels = _assign(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        if is_distributed():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        nonempty = counts > 0
        centres = torch.where(nonempty[:, None], F.normalize(sums, dim=1), centres)
    return centres, counts
