"""The torch.distributed helpers every data-parallel piece shares (estimate, k-means, batch norm, epoch metrics)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over all ranks when torch.distributed is initialised; ``x`` itself otherwise."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all ranks when torch.distributed is initialised; ``x`` itself otherwise."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_cat(x: Tensor) -> Tensor:
    """``cat(x_0, ..., x_{W-1})`` along dim 0, every rank's ``x`` in rank order (all of the same shape); ``x`` itself
    without a process group."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
