"""A linear probe on frozen features that do not fit in memory: the features stream past in blocks, one block in
memory at a time.

Same objective as :func:`excb.evaluation.metrics.linear_probe_top1` (the full-batch L-BFGS probe, kept where the
features fit): with x standardised per dimension by the train split's mean μ and standard deviation σ,

    min_{W, b}  (1/N) Σ_i CE(W x_i + b, y_i) + (λ/2) ‖W‖²    (bias not decayed),

here by mini-batch SGD with momentum 0.9 and a cosine learning rate from ``lr`` to 0 over ``epochs`` passes.
μ and σ come from one streaming pass (sums of x and x² in float64); each later pass visits the blocks in the
order given and shuffles the rows inside each block with a seeded generator, so a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

Blocks = Callable[[], Iterable[tuple[Tensor, Tensor]]]  # a new pass over (features [M, D], labels [M]) blocks


def _moments_and_block_rows(blocks: Blocks) -> tuple[Tensor, Tensor, list[int]]:
    """One pass: per-dimension mean and standard deviation (population, floored at 1e-6) of the features, from
    float64 sums of x and x², and the row count of every block."""
    total = total_sq = None
    rows: list[int] = []
    for x, _ in blocks():
        x = x.double()
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = x.pow(2).sum(0) if total_sq is None else total_sq + x.pow(2).sum(0)
        rows.append(x.shape[0])
    n = sum(rows)
    if total is None or total_sq is None or n == 0:
        raise ValueError("no training features")
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float(), rows


def streaming_moments(blocks: Blocks) -> tuple[Tensor, Tensor, int]:
    """Per-dimension mean and standard deviation (population, floored at 1e-6) of the features of one pass, and
    their count, from float64 sums of x and x²."""
    mean, std, rows = _moments_and_block_rows(blocks)
    return mean, std, sum(rows)


def streaming_linear_probe(train_blocks: Blocks, num_classes: int, *, epochs: int = 10, lr: float = 0.1,
                           batch_size: int = 1024, weight_decay: float = 1e-4,
                           seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit (W, b) as the module docstring says; returns (W, b, μ, σ)."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    mean, std, block_rows = _moments_and_block_rows(train_blocks)
    weight = torch.zeros(num_classes, mean.shape[0], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9)
    total = epochs * sum(math.ceil(rows / batch_size) for rows in block_rows)  # no extra pass to count steps
    gen = torch.Generator().manual_seed(seed)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            for x, y in train_blocks():
                x = (x.float() - mean) / std
                y = torch.as_tensor(y).long()
                order = torch.randperm(x.shape[0], generator=gen)
                for i in range(0, x.shape[0], batch_size):
                    idx = order[i:i + batch_size]
                    for g in opt.param_groups:
                        g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                    loss = F.cross_entropy(F.linear(x[idx], weight, bias), y[idx]) \
                        + 0.5 * weight_decay * weight.pow(2).sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    step += 1
    return weight.detach(), bias.detach(), mean, std


@torch.no_grad()
def streaming_linear_top1(train_blocks: Blocks, test_blocks: Blocks, num_classes: int, **fit_options: float) -> float:
    """Top-1 (percent) on the test blocks of the probe fitted by :func:`streaming_linear_probe` on the train
    blocks (``fit_options``: epochs, lr, batch_size, weight_decay, seed)."""
    weight, bias, mean, std = streaming_linear_probe(train_blocks, num_classes, **fit_options)  # type: ignore[arg-type]
    correct = total = 0
    for x, y in test_blocks():
        pred = F.linear((x.float() - mean) / std, weight, bias).argmax(dim=1)
        correct += int((pred == torch.as_tensor(y).long()).sum())
        total += x.shape[0]
    if total == 0:
        raise ValueError("no test features")
    return 100.0 * correct / total
