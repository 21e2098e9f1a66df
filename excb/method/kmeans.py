"""Spherical k-means for prototype initialisation, data-parallel across ranks.

Features stay on their rank; only the per-rank feature counts, the initial centres, the per-cluster sums and
counts and the re-seeding candidates are exchanged, so every rank ends with the same centres.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from excb.distributed import is_distributed

_CHUNK = 8192  # rows per E-step matmul, to bound memory at [chunk, k]


def _all_gather(t: Tensor) -> list[Tensor]:
    """Every rank's ``t`` (same shape on all ranks) in rank order; ``[t]`` without a process group."""
    if not is_distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _padded_gather(t: Tensor, rows: int, fill: float) -> list[Tensor]:
    """All-gather ``t`` [m, ...] (m ≤ rows, m may differ per rank), padded with ``fill`` to ``rows`` rows."""
    return _all_gather(torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), fill)]))


def split_quotas(sizes: list[int], k: int) -> list[int]:
    """How many initial centres each rank draws, given every rank's feature count ``sizes``.

    k // world each, the remainder one each to the first ranks, capped at the rank's feature count; any shortfall
    goes, in rank order, to ranks with spare features. Deterministic, so every rank computes the same quotas.
    """
    total = sum(sizes)
    if total < k:
        raise ValueError(f"k-means needs at least as many features as clusters to start from distinct samples: "
                         f"{total} feature(s) over {len(sizes)} rank(s) (per rank {sizes}) for k = {k} clusters "
                         "(raise method.kmeans_samples, or use more data, or lower model.num_prototypes)")
    world = len(sizes)
    quotas = [min(k // world + int(r < k % world), n) for r, n in enumerate(sizes)]
    for r, n in enumerate(sizes):
        quotas[r] += min(n - quotas[r], k - sum(quotas))
    return quotas


def initial_centres(x: Tensor, k: int, seed: int = 0) -> Tensor:
    """k distinct rows of the (global) data, identical on every rank: rank r draws ``split_quotas(...)[r]``
    distinct local rows with a generator seeded from (seed, r); the draws are all-gathered in rank order."""
    rank = dist.get_rank() if is_distributed() else 0
    sizes = [int(s) for s in _all_gather(torch.tensor([x.shape[0]], device=x.device))]
    quotas = split_quotas(sizes, k)
    gen = torch.Generator().manual_seed(seed + 1_000_003 * rank)
    idx = torch.randperm(x.shape[0], generator=gen)[:quotas[rank]].to(x.device)
    parts = _padded_gather(x[idx], max(quotas), 0.0)
    return torch.cat([p[:q] for p, q in zip(parts, quotas)])


def _assign(x: Tensor, centres: Tensor) -> Tensor:
    """E-step: a_n = argmax_k <x_n, c_k>, computed in row chunks (an empty ``x`` gives no labels)."""
    return torch.cat([(x[i:i + _CHUNK] @ centres.T).argmax(dim=1) for i in range(0, max(x.shape[0], 1), _CHUNK)])


def _cluster_stats(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums Σ_{a_n = k} x_n [k, D] and counts [k], all-reduced over ranks."""
    sums = x.new_zeros(k, x.shape[1]).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    if is_distributed():
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return sums, counts


def _reseed_empty(x: Tensor, centres: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
    """Empty clusters (global count 0), in index order, take the globally worst-served distinct points:
    lowest s_n = <x_n, c_{a_n}>, each rank offering its E lowest (E = number of empty clusters)."""
    empty = (counts == 0).nonzero().flatten()
    e = empty.numel()
    if e == 0:
        return centres
    sims = torch.cat([(x[i:i + _CHUNK] * centres[labels[i:i + _CHUNK]]).sum(dim=1)
                      for i in range(0, max(x.shape[0], 1), _CHUNK)])
    low, idx = sims.topk(min(e, x.shape[0]), largest=False)
    cand_sims = torch.cat(_padded_gather(low, e, float("inf")))
    cand_points = torch.cat(_padded_gather(x[idx], e, 0.0))
    pick = cand_sims.sort(stable=True).indices[:e]  # ≥ e real candidates: all ranks hold ≥ k > e points
    centres = centres.clone()
    centres[empty] = cand_points[pick]
    return centres


def spherical_kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Cluster unit vectors ``x`` [N, D] (this rank's share) into ``k`` centres on the sphere; returns
    (centres [k, D], counts [k]), identical on every rank, counts global.

    Initialise with k distinct data rows drawn from every rank (``initial_centres``); raises ValueError when all
    ranks together hold fewer than k features. Then ``iters`` times:
    E-step a_n = argmax_k <x_n, c_k>; M-step c_k = normalise(Σ_{a_n = k} x_n) with sums and counts all-reduced;
    clusters with count 0 are re-seeded with the globally worst-served points (lowest <x_n, c_{a_n}>).
    A final E-step gives the returned counts; while a cluster is still empty, up to ``iters`` more rounds run.
    Clusters can stay empty only when k exceeds the number of distinct points.
    """
    if x.ndim != 2 or k < 1:
        raise ValueError(f"need an [N, D] feature matrix and k ≥ 1, got shape {tuple(x.shape)} and k = {k}")
    x = F.normalize(x.float(), dim=1)
    centres = initial_centres(x, k, seed)
    for step in range(2 * iters + 1):
        labels = _assign(x, centres)
        sums, counts = _cluster_stats(x, labels, k)
        if step == 2 * iters or (step >= iters and bool((counts > 0).all())):
            break
        centres = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centres)
        centres = _reseed_empty(x, centres, labels, counts)
    return centres, counts
