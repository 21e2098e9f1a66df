"""The baselines behind the Balancer interface (excb.method.baselines), each against its own published equations."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testkit.net import free_port

from excb.config import BALANCERS, ConfigError, load_config
from excb.method.balancing import ClusterBalancer
from excb.method.baselines import (
    BALANCER_REGISTRY,
    CenteringBalancer,
    NoBalancer,
    SinkhornBalancer,
    build_balancer,
    sinkhorn_knopp,
)


def _z(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(k, 16, generator=gen), dim=1).T


def test_none_is_the_plain_softmax() -> None:
    z = _z(8, 5)
    torch.testing.assert_close(NoBalancer(5).targets(z, 0.04), torch.softmax(z / 0.04, dim=-1))


def test_centering_subtracts_the_centre_and_updates_it_by_ema() -> None:
    b = CenteringBalancer(4, center_momentum=0.9)
    z1 = torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(b.targets(z1, 0.1), torch.softmax(z1 / 0.1, dim=-1))  # c starts at 0
    b.observe(z1, b.targets(z1, 0.1))
    c1 = 0.1 * z1.mean(0)
    torch.testing.assert_close(b.center, c1)
    z2 = _z(6, 4, seed=1)
    b.observe(z2, b.targets(z2, 0.1))
    torch.testing.assert_close(b.center, 0.9 * c1 + 0.1 * z2.mean(0))
    torch.testing.assert_close(b.targets(z2, 0.1), torch.softmax((z2 - b.center) / 0.1, dim=-1))
    assert "center" in b.state_dict() and "sizes" in b.state_dict()


def test_centering_pulls_targets_away_from_a_dominant_prototype() -> None:
    z = torch.full((64, 3), -0.5)
    z[:, 0] = 0.9  # every sample prefers prototype 0
    z[:32, 1] = 0.85
    b = CenteringBalancer(3, center_momentum=0.0)  # centre = the last batch mean
    b.observe(z, b.targets(z, 0.04))
    # centred: 0.9 − 0.9 = 0 against 0.85 − 0.85 = 0 for half the rows and −0.5 + 0.5 = 0: no preference left
    assert b.targets(z, 0.04)[:32, 0].mean() < torch.softmax(z / 0.04, dim=-1)[:32, 0].mean()


def test_sinkhorn_rows_are_distributions_and_prototypes_get_equal_mass() -> None:
    z = _z(128, 8)
    q = sinkhorn_knopp(z, epsilon=0.05, iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(128))  # each sample's code sums to 1
    torch.testing.assert_close(q.sum(0), torch.full((8,), 128 / 8), atol=1e-3, rtol=1e-3)  # equipartition
    # while the plain softmax at the same temperature is far from equipartitioned
    assert torch.softmax(z / 0.05, dim=-1).sum(0).std() > 10 * q.sum(0).std()


def test_sinkhorn_is_a_diagonal_scaling_of_exp_z_over_epsilon() -> None:
    """Sinkhorn-Knopp returns diag(u)·exp(z/ε)·diag(v): log q − z/ε = a_i + b_k has no interaction term."""
    z = _z(32, 6, seed=3)
    for iters in (1, 3, 10):
        r = torch.log(sinkhorn_knopp(z, 0.05, iters).double()) - z.double() / 0.05
        resid = r - r.mean(1, keepdim=True) - r.mean(0, keepdim=True) + r.mean()
        assert resid.abs().max() < 1e-3


def test_sinkhorn_three_iterations_match_a_direct_implementation_of_swav_algorithm() -> None:
    z = _z(20, 5, seed=4).double()
    q = torch.exp(z / 0.05).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(3):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    ref = (q * b).T
    torch.testing.assert_close(sinkhorn_knopp(z, 0.05, 3).double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(SinkhornBalancer(5, epsilon=0.05, iterations=3).targets(z.float(), 0.04).double(), ref,
                               rtol=1e-4, atol=1e-6)


def test_every_balancer_tracks_the_hard_assignment_estimate() -> None:
    z = _z(64, 4, seed=5)
    for b in (NoBalancer(4, momentum=0.5), CenteringBalancer(4, center_momentum=0.9, momentum=0.5),
              SinkhornBalancer(4, momentum=0.5), ClusterBalancer(4, momentum=0.5)):
        p = b.targets(z, 0.04)
        b.observe(z, p)
        hist = torch.bincount(p.argmax(1), minlength=4).float() / 64
        torch.testing.assert_close(b.sizes, 0.5 * torch.full((4,), 0.25) + 0.5 * hist)


def test_build_balancer_follows_the_config() -> None:
    kinds = {"excb": ClusterBalancer, "centering": CenteringBalancer, "sinkhorn": SinkhornBalancer,
             "none": NoBalancer}
    for name, cls in kinds.items():
        cfg = load_config(None, [f"method.balancer={name}", "model.num_prototypes=16", "method.center_momentum=0.8",
                                 "method.sinkhorn_epsilon=0.03", "method.sinkhorn_iters=5"])
        b = build_balancer(cfg)
        assert type(b) is cls and b.num_clusters == 16
    assert build_balancer(load_config(None, ["method.balancer=centering", "method.center_momentum=0.8"])) \
        .center_momentum == 0.8
    s = build_balancer(load_config(None, ["method.balancer=sinkhorn", "method.sinkhorn_epsilon=0.03",
                                          "method.sinkhorn_iters=5", "method.balance_momentum=0.9"]))
    assert (s.epsilon, s.iterations, s.momentum) == (0.03, 5, 0.9)
    e = build_balancer(load_config(None, ["method.argmax_boost=1.2", "method.balance_momentum=0.8"]))
    assert (e.argmax_boost, e.momentum) == (1.2, 0.8)
    assert BALANCER_REGISTRY.names() == BALANCERS  # what the config accepts is what the registry builds
    with pytest.raises(ConfigError, match="method.balancer"):
        load_config(None, ["method.balancer=swav"])
    with pytest.raises(ConfigError, match="method.sinkhorn_epsilon"):
        load_config(None, ["method.sinkhorn_epsilon=0"])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z = _z(48, 6, seed=7)[rank * 24:(rank + 1) * 24]  # each rank holds half of one global batch
        codes = sinkhorn_knopp(z, 0.05, 3)
        c = CenteringBalancer(6, center_momentum=0.5)
        c.observe(z, c.targets(z, 0.1))
        torch.save({"codes": codes, "center": c.center}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_and_centering_over_two_ranks_equal_one_process_on_the_global_batch(tmp_path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"{i}.pt", weights_only=True) for i in range(2)]
    z = _z(48, 6, seed=7)
    torch.testing.assert_close(torch.cat([r[0]["codes"], r[1]["codes"]]), sinkhorn_knopp(z, 0.05, 3),
                               rtol=1e-5, atol=1e-7)
    # a rank alone would solve a different problem
    assert not torch.allclose(r[0]["codes"], sinkhorn_knopp(z[:24], 0.05, 3), atol=1e-4)
    torch.testing.assert_close(r[0]["center"], 0.5 * z.mean(0))
    torch.testing.assert_close(r[1]["center"], r[0]["center"], rtol=0, atol=0)
