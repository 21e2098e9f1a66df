"""Spherical k-means (excb.kmeans); the distributed path is in test_balancing_distributed.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from excb.kmeans import spherical_kmeans


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


def test_empty_cluster_keeps_its_centre() -> None:
    x = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05]]), dim=1)
    centres, counts = spherical_kmeans(x, k=5, iters=3, seed=0)  # more clusters than distinct points
    assert (counts == 0).any()
    assert torch.isfinite(centres).all() and torch.allclose(centres.norm(dim=1), torch.ones(5), atol=1e-5)
