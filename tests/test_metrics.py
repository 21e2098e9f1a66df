"""Evaluation metrics: cluster accuracies on hand-made contingency tables, ARI/NMI, the linear probe, the 2-D
embedding plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from excb.evaluation.embedding import embed_2d, plot_embedding
from excb.evaluation.metrics import (
    ari,
    cluster_acc_hungarian,
    cluster_acc_majority,
    contingency,
    linear_probe_top1,
    nmi,
)


def _from_table(table: list[list[int]], cluster_ids: list[int] | None = None,
                class_ids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(assignments, labels) with contingency ``table`` [clusters × classes], shuffled."""
    t = np.asarray(table)
    cid = np.asarray(cluster_ids if cluster_ids is not None else range(t.shape[0]))
    yid = np.asarray(class_ids if class_ids is not None else range(t.shape[1]))
    a, y = [], []
    for k in range(t.shape[0]):
        for c in range(t.shape[1]):
            a += [cid[k]] * int(t[k, c])
            y += [yid[c]] * int(t[k, c])
    perm = np.random.default_rng(0).permutation(len(a))
    return np.asarray(a)[perm], np.asarray(y)[perm]


def test_hungarian_beats_greedy_and_majority_is_purity() -> None:
    # Greedy matching takes the largest cell (cluster 0 → class 0, 3) and is left with 0: total 3 of 7.
    # The optimal one-to-one matching is cluster 0 → class 1, cluster 1 → class 0: 2 + 2 = 4 of 7.
    a, y = _from_table([[3, 2], [2, 0]])
    assert cluster_acc_hungarian(a, y) == pytest.approx(100 * 4 / 7)
    assert cluster_acc_majority(a, y) == pytest.approx(100 * 5 / 7)  # rows' maxima 3 + 2


def test_more_clusters_than_classes() -> None:
    # 3 clusters, 2 classes: only two clusters get a class one-to-one (5 + 3 = 8 of 13); by majority every
    # cluster takes its most frequent label (5 + 4 + 3 = 12 of 13). Arbitrary, non-contiguous ids.
    a, y = _from_table([[5, 1], [4, 0], [0, 3]], cluster_ids=[17, 3, 900], class_ids=[7, 2])
    np.testing.assert_array_equal(contingency(a, y), [[0, 4], [1, 5], [3, 0]])  # rows 3, 17, 900; cols 2, 7
    assert cluster_acc_hungarian(a, y) == pytest.approx(100 * 8 / 13)
    assert cluster_acc_majority(a, y) == pytest.approx(100 * 12 / 13)


def test_fewer_clusters_than_classes() -> None:
    a, y = _from_table([[4, 4, 1], [0, 1, 6]])  # best: 4 + 6 = 10 of 16; majority 4 + 6
    assert cluster_acc_hungarian(a, y) == pytest.approx(100 * 10 / 16)
    assert cluster_acc_majority(a, y) == pytest.approx(100 * 10 / 16)


def test_perfect_and_permuted_labels() -> None:
    y = np.random.default_rng(1).integers(0, 10, 3000)
    perm = np.random.default_rng(2).permutation(10) + 50  # renamed clusters
    for a in (y, perm[y]):
        assert nmi(a, y) == pytest.approx(1.0)
        assert ari(a, y) == pytest.approx(1.0)
        assert cluster_acc_hungarian(a, y) == pytest.approx(100.0)
        assert cluster_acc_majority(a, y) == pytest.approx(100.0)
    split = np.where(np.arange(len(y)) % 2 == 0, y, y + 10)  # every class split over two clusters
    assert cluster_acc_majority(split, y) == pytest.approx(100.0)
    best = sum(max((split == c).sum(), (split == c + 10).sum()) for c in range(10))  # one cluster per class
    assert cluster_acc_hungarian(split, y) == pytest.approx(100 * best / len(y))
    assert ari(split, y) < 0.9


def test_independent_assignments_score_near_zero() -> None:
    rng = np.random.default_rng(3)
    y, a = rng.integers(0, 10, 20000), rng.integers(0, 10, 20000)
    assert abs(ari(a, y)) < 0.01
    assert nmi(a, y) < 0.01
    assert cluster_acc_hungarian(a, y) < 13.0


def test_contingency_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        contingency(np.zeros(3), np.zeros(4))


def _blobs(n: int, gen: torch.Generator, centres: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, centres.shape[0], (n,), generator=gen)
    return centres[y] + noise * torch.randn(n, centres.shape[1], generator=gen), y


def test_linear_probe_separable_and_random_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    # Classes separated along a random direction each, with large per-dimension offsets and scales that the
    # probe's standardisation has to undo; kNN-style cosine methods would struggle with the offset.
    centres = torch.randn(10, 64, generator=gen)
    xtr, ytr = _blobs(3000, gen, centres, 0.3)
    xte, yte = _blobs(1000, gen, centres, 0.3)
    scale, offset = torch.rand(64, generator=gen) * 100 + 1, torch.randn(64, generator=gen) * 1000
    acc = linear_probe_top1(xtr * scale + offset, ytr, xte * scale + offset, yte)
    assert acc > 99.0
    assert acc == linear_probe_top1(xtr * scale + offset, ytr, xte * scale + offset, yte)  # deterministic
    # Labels independent of the features: test accuracy at chance (10 %; ±3 points is > 4 standard errors).
    rtr = torch.randint(0, 10, (3000,), generator=gen)
    rte = torch.randint(0, 10, (1000,), generator=gen)
    assert 7.0 < linear_probe_top1(xtr, rtr, xte, rte) < 13.0


def test_linear_probe_needs_the_features() -> None:
    # Same labels, features with no class signal: chance, so the probe is not reading the labels elsewhere.
    gen = torch.Generator().manual_seed(4)
    ytr, yte = torch.randint(0, 4, (2000,), generator=gen), torch.randint(0, 4, (500,), generator=gen)
    xtr, xte = torch.randn(2000, 32, generator=gen), torch.randn(500, 32, generator=gen)
    assert linear_probe_top1(xtr, ytr, xte, yte) < 32.0
    xtr[:, 0] += ytr * 3.0  # one informative dimension
    xte[:, 0] += yte * 3.0
    assert linear_probe_top1(xtr, ytr, xte, yte) > 80.0


def test_embedding_pca_and_plot(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    centres = torch.randn(3, 20, generator=gen) * 5
    x, y = _blobs(300, gen, centres, 0.5)
    xy = embed_2d(x, "pca")
    assert xy.shape == (300, 2)
    # The two leading components separate three well-spread blobs: each point is nearest to its own class mean.
    means = np.stack([xy[y.numpy() == c].mean(0) for c in range(3)])
    nearest = np.argmin(((xy[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == y.numpy()).mean() > 0.95
    for method in ("pca", "tsne"):
        out = plot_embedding(x, y.numpy(), str(tmp_path / "plots" / f"e_{method}.png"), method=method,
                             max_points=200)
        data = Path(out).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="unknown embedding"):
        embed_2d(x, "umap")
