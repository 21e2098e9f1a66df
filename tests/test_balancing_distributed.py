"""A real 2-process gloo group: every rank holds the same size estimate after updates from different batches, and
the same k-means result (distinct initial centres drawn from both ranks, no empty cluster)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testkit.net import free_port

from excb.method.balancing import ClusterBalancer
from excb.method.kmeans import initial_centres, spherical_kmeans

pytestmark = pytest.mark.slow  # spawns processes


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        k = 6
        b = ClusterBalancer(num_clusters=k, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)  # different local batches per rank
        for _ in range(5):
            b.update(torch.rand(32, k, generator=gen) ** (4 + 4 * rank))
        x = torch.nn.functional.normalize(torch.randn(200, 8, generator=gen) + 3 * torch.eye(8)[rank], dim=1)
        centres, counts = spherical_kmeans(x, k=4, iters=10, seed=0)
        torch.save({"sizes": b.sizes, "centres": centres, "counts": counts}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_ranks_hold_the_same_estimate(tmp_path) -> None:
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "1.pt", weights_only=True)
    torch.testing.assert_close(r0["sizes"], r1["sizes"], atol=0, rtol=0)
    torch.testing.assert_close(r0["centres"], r1["centres"], atol=0, rtol=0)
    assert r0["counts"].sum() == 400  # k-means counts are global: both ranks' 200 samples

    # the estimate equals the single-process update with the mean of both ranks' histograms
    ref = ClusterBalancer(num_clusters=6, momentum=0.9)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(world)]
    from excb.method.balancing import assignment_histogram

    for _ in range(5):
        hists = [assignment_histogram(torch.rand(32, 6, generator=g) ** (4 + 4 * r)) for r, g in enumerate(gens)]
        ref.sizes.mul_(0.9).add_(torch.stack(hists).mean(0), alpha=0.1)
    torch.testing.assert_close(r0["sizes"], ref.sizes)
    assert not torch.allclose(r0["sizes"], torch.full((6,), 1 / 6))


def _kmeans_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        k = 48  # each rank holds 40 < k features of its own
        x = torch.nn.functional.normalize(torch.randn(40, 4, generator=torch.Generator().manual_seed(7 + rank)), dim=1)
        init = initial_centres(x, k, seed=0)
        uneven = initial_centres(x[:12] if rank == 0 else x, k, seed=0)  # quotas [12, 36]
        centres, counts = spherical_kmeans(x, k=k, iters=10, seed=0)
        try:
            initial_centres(x[:3], k, seed=0)  # 6 features in total
            error = ""
        except ValueError as exc:
            error = str(exc)
        torch.save({"x": x, "init": init, "uneven": uneven, "centres": centres, "counts": counts, "error": error},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _row_indices(rows: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    match = (rows[:, None, :] == data[None, :, :]).all(dim=2)
    assert (match.sum(dim=1) == 1).all()
    return match.float().argmax(dim=1)


def test_kmeans_across_ranks_starts_distinct_and_ends_without_empty_clusters(tmp_path) -> None:
    world = 2
    mp.spawn(_kmeans_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "1.pt", weights_only=True)
    for key in ("init", "uneven", "centres", "counts"):
        torch.testing.assert_close(r0[key], r1[key], atol=0, rtol=0)
    data = torch.cat([r0["x"], r1["x"]])
    idx = _row_indices(r0["init"], data)
    assert idx.unique().numel() == 48 and (idx < 40).sum() == 24  # 24 distinct rows from each rank
    uneven = _row_indices(r0["uneven"], torch.cat([r0["x"][:12], r1["x"]]))
    assert uneven.unique().numel() == 48 and (uneven < 12).sum() == 12
    assert (r0["counts"] > 0).all() and r0["counts"].sum() == 80
    assert torch.allclose(r0["centres"].norm(dim=1), torch.ones(48), atol=1e-5)
    assert "6 feature(s) over 2 rank(s)" in r0["error"] and "k = 48 clusters" in r0["error"]
    assert r0["error"] == r1["error"]
