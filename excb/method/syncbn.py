"""Batch normalisation over the global batch of all ranks, on any device.

``torch.nn.SyncBatchNorm`` only runs on accelerators (CUDA, XPU, ...); CPU workers need their own. With ``R`` ranks
holding ``x_r`` (``n_r`` values per channel each), the layer normalises with the statistics of the union:

    μ = Σ_r Σ x_r / Σ_r n_r,        σ² = Σ_r Σ (x_r − μ)² / Σ_r n_r,        y = γ (x − μ) / √(σ² + ε) + β

using differentiable all-reduces, so gradients also flow through the global statistics (as in SyncBatchNorm).
Running statistics use the unbiased global variance, like ``BatchNorm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from excb.distributed import is_distributed


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_r x_r over ranks; the gradient w.r.t. each x_r is Σ_r ∂L/∂y_r (every rank's loss uses y)."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:  # type: ignore[override]
        g = grad.clone()
        dist.all_reduce(g)
        return g


def _all_reduce_sum(x: Tensor) -> Tensor:
    return _AllReduceSum.apply(x)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all ranks (2-D or 4-D input); plain BatchNorm on one rank or in eval."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2-D to 5-D input (got {input.dim()}-D)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        c = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, c] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        totals = _all_reduce_sum(torch.cat([x.sum(dims), count]))  # differentiable sum over ranks
        n = totals[-1]
        mean = totals[:c] / n
        centred = x - mean.view(shape)
        var = _all_reduce_sum(centred.pow(2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_global_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm layer by one over the global batch: ``torch.nn.SyncBatchNorm`` on accelerators,
    :class:`GlobalBatchNorm` on CPU. Parameters and running statistics are kept."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_global_batchnorm(child, device_type))
    return out
