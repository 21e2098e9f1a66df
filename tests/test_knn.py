"""Block-wise weighted kNN (excb.evaluation.knn) against brute force over all train features at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from excb.data import load_fashion_mnist
from excb.evaluation.knn import (
    Neighbours,
    blockwise_neighbours,
    knn_top1_blockwise,
    merge_topk,
)
from excb.evaluation.metrics import knn_top1


def _brute_force_top1(train: torch.Tensor, ytr: torch.Tensor, test: torch.Tensor, yte: torch.Tensor, k: int,
                      t: float) -> float:
    """DINO's weighted kNN with the whole similarity matrix in memory (the reference)."""
    sims = F.normalize(test.float(), dim=1) @ F.normalize(train.float(), dim=1).T
    top, idx = sims.topk(min(k, train.shape[0]), dim=1)
    votes = torch.zeros(test.shape[0], int(max(ytr.max(), yte.max())) + 1, dtype=torch.float32)
    votes.scatter_add_(1, ytr[idx].long(), (top / t).exp())
    return 100.0 * (votes.argmax(1) == yte).float().mean().item()


def _blocks(x: torch.Tensor, y: torch.Tensor, sizes: list[int]):
    start = 0
    for n in sizes:
        yield x[start:start + n], y[start:start + n]
        start += n
    assert start == x.shape[0]


@pytest.mark.parametrize("sizes", [[500], [37, 200, 1, 262], [5] * 100], ids=["one", "uneven", "smaller-than-k"])
def test_blockwise_neighbours_equal_brute_force(sizes: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(500, 16, generator=g), torch.randn(70, 16, generator=g)
    ytr = torch.randint(0, 7, (500,), generator=g)
    got = blockwise_neighbours(test, _blocks(train, ytr, sizes), k=20, test_chunk=32)
    sims = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    top, idx = sims.topk(20, dim=1)
    torch.testing.assert_close(got.sims, top)
    assert torch.equal(got.labels, ytr[idx])


def test_merge_keeps_the_k_largest_in_order() -> None:
    a = Neighbours(torch.tensor([[0.9, 0.5]]), torch.tensor([[1, 2]]))
    b = Neighbours(torch.tensor([[0.7, 0.1]]), torch.tensor([[3, 4]]))
    m = merge_topk(a, b, 3)
    assert m.sims[0].tolist() == pytest.approx([0.9, 0.7, 0.5]) and m.labels.tolist() == [[1, 3, 2]]


def test_accuracy_equals_brute_force_on_clustered_features() -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 8, generator=g)
    ytr, yte = torch.randint(0, 5, (800,), generator=g), torch.randint(0, 5, (300,), generator=g)
    train = centres[ytr] + 0.9 * torch.randn(800, 8, generator=g)
    test = centres[yte] + 0.9 * torch.randn(300, 8, generator=g)
    expected = _brute_force_top1(train, ytr, test, yte, 20, 0.07)
    assert 40.0 < expected < 100.0  # a task where neighbours matter
    got = knn_top1_blockwise(_blocks(train, ytr, [100] * 8), test, yte, 5, k=20, temperature=0.07, test_chunk=64)
    assert got == pytest.approx(expected, abs=1e-9)


def test_fashion_mnist_knn_is_todays_number() -> None:
    """Raw Fashion-MNIST pixels, 20,000 train → 2,000 test images: the block-wise kNN of metrics.knn_top1 (blocks of
    3,000 train rows) gives the in-memory number to 0.01 points."""
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    train = torch.from_numpy(xtr[:20000].reshape(20000, -1)).float()
    test = torch.from_numpy(xte[:2000].reshape(2000, -1)).float()
    ytr_t, yte_t = torch.from_numpy(ytr[:20000]).long(), torch.from_numpy(yte[:2000]).long()
    expected = _brute_force_top1(train, ytr_t, test, yte_t, 20, 0.07)
    got = knn_top1(train, ytr_t, test, yte_t, k=20, temperature=0.07, chunk=500, train_block=3000)
    assert got == pytest.approx(expected, abs=0.01)
    assert got > 75.0  # raw pixels score about 80 % on this subset
