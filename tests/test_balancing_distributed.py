"""A real 2-process gloo group: every rank holds the same size estimate after updates from different batches."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from excb.balancing import ClusterBalancer
from excb.kmeans import spherical_kmeans
from netutil import free_port


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
    from excb.balancing import assignment_histogram

    for _ in range(5):
        hists = [assignment_histogram(torch.rand(32, 6, generator=g) ** (4 + 4 * r)) for r, g in enumerate(gens)]
        ref.sizes.mul_(0.9).add_(torch.stack(hists).mean(0), alpha=0.1)
    torch.testing.assert_close(r0["sizes"], ref.sizes)
    assert not torch.allclose(r0["sizes"], torch.full((6,), 1 / 6))
