"""Spherical k-means (excb.method.kmeans); the distributed path is in test_balancing_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from excb.method.kmeans import initial_centres, spherical_kmeans, split_quotas


def _row_indices(rows: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """For each of ``rows``, the index of the one row of ``data`` it equals exactly (asserts exactly one)."""
    match = (rows[:, None, :] == data[None, :, :]).all(dim=2)
    assert (match.sum(dim=1) == 1).all()
    return match.float().argmax(dim=1)


def test_recovers_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    true = F.normalize(torch.randn(5, 16, generator=gen), dim=1)
    labels = torch.arange(500) % 5
    x = F.normalize(true[labels] + 0.05 * torch.randn(500, 16, generator=gen), dim=1)
    centres, counts = spherical_kmeans(x, k=5, iters=20, seed=1)
    assert torch.allclose(centres.norm(dim=1), torch.ones(5), atol=1e-5)
    assert counts.sum() == 500
    sims = centres @ true.T  # every true centre is matched by a found one
    assert sims.max(dim=0).values.min() > 0.99


def test_initial_centres_are_distinct_rows() -> None:
    x = F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    init = initial_centres(x, k=64, seed=3)  # k = N: must be a permutation of all rows
    assert init.shape == (64, 8)
    assert _row_indices(init, x).unique().numel() == 64
    torch.testing.assert_close(init, initial_centres(x, k=64, seed=3), atol=0, rtol=0)  # seeded


def test_split_quotas() -> None:
    assert split_quotas([40, 40], 48) == [24, 24]
    assert split_quotas([30, 30, 30], 10) == [4, 3, 3]  # remainder to the first ranks
    assert split_quotas([12, 40], 48) == [12, 36]  # rank 0's shortfall moves to rank 1
    assert split_quotas([0, 5, 100], 9) == [0, 5, 4]
    assert split_quotas([7], 7) == [7]


def test_too_few_features_raises() -> None:
    with pytest.raises(ValueError, match=r"10 feature\(s\) over 1 rank.*k = 11 clusters"):
        spherical_kmeans(torch.randn(10, 4), k=11)
    with pytest.raises(ValueError, match=r"7 feature\(s\) over 3 rank"):
        split_quotas([2, 0, 5], 8)


@pytest.mark.parametrize(("seed", "k"), [(0, 40), (2, 100)])
def test_uneven_density_leaves_no_cluster_empty(seed: int, k: int) -> None:
    # one dense blob holding almost every point, plus a few scattered points: with the same initial centres but
    # no re-seeding (empty clusters keeping their old centre), 1-2 clusters end empty here
    gen = torch.Generator().manual_seed(seed)
    blob = F.normalize(torch.tensor([1.0, 0, 0, 0]) + 0.02 * torch.randn(980, 4, generator=gen), dim=1)
    x = torch.cat([blob, F.normalize(torch.randn(20, 4, generator=gen), dim=1)])
    centres, counts = spherical_kmeans(x, k=k, iters=10, seed=0)
    assert (counts > 0).all()
    assert counts.sum() == x.shape[0]
    assert torch.allclose(centres.norm(dim=1), torch.ones(k), atol=1e-5)
    labels = (x @ centres.T).argmax(dim=1)  # counts are those of the final assignment to the returned centres
    torch.testing.assert_close(torch.bincount(labels, minlength=k).float(), counts)


def test_more_clusters_than_distinct_points_terminates() -> None:
    x = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05]]), dim=1).repeat(2, 1)  # 3 distinct of 6
    centres, counts = spherical_kmeans(x, k=5, iters=3, seed=0)
    assert (counts == 0).any() and counts.sum() == 6
    assert torch.isfinite(centres).all() and torch.allclose(centres.norm(dim=1), torch.ones(5), atol=1e-5)
