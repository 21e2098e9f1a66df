"""The ExCB operator and size estimate (excb.method.balancing)."""

from __future__ import annotations

import pytest
import torch

from excb.method.balancing import (
    ClusterBalancer,
    assignment_histogram,
    balance_similarities,
)


def test_worked_example_from_method_page() -> None:
    sizes = torch.tensor([0.9, 0.1])
    z = torch.tensor([[0.5, 0.2], [1.0, -1.0]])
    out = balance_similarities(z, sizes, argmax_boost=1.0)
    expected = torch.tensor([[-1 / 6, 0.84], [1 / 9, 0.6]])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_worked_example_with_boost_and_clamp() -> None:
    b = ClusterBalancer(num_clusters=2, momentum=0.999)
    b.sizes.copy_(torch.tensor([0.9, 0.1]))
    out = b.balance(torch.tensor([[0.5, 0.2], [1.0, -1.0], [-0.2, 0.999]]))
    # argmax entries boosted ×1.01: 0.84 → 0.8484, 0.6 → 0.606; 1 − 0.001·0.2 = 0.9998 → clamped to 1
    torch.testing.assert_close(out[0], torch.tensor([-1 / 6, 0.84 * 1.01]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], torch.tensor([1 / 9, 0.606]), atol=1e-4, rtol=0)
    assert out[2, 1] == 1.0


@pytest.mark.parametrize("k", [2, 7, 1024])
def test_identity_at_uniform_sizes(k: int) -> None:
    b = ClusterBalancer(num_clusters=k)
    torch.testing.assert_close(b.sizes.sum(), torch.tensor(1.0))
    z = torch.rand(64, k) * 2 - 1
    torch.testing.assert_close(balance_similarities(z, b.sizes, argmax_boost=1.0), z)
    # any scaling of a uniform estimate is still uniform
    torch.testing.assert_close(balance_similarities(z, torch.full((k,), 3.0), argmax_boost=1.0), z)


def test_monotone_in_z() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = torch.rand(16, generator=gen) + 1e-3
    z = torch.linspace(-1, 1, 201)[:, None].expand(201, 16)
    out = balance_similarities(z, sizes, argmax_boost=1.0)
    assert torch.all(out[1:] >= out[:-1] - 1e-7)
    assert torch.all(out[1:] - out[:-1] > 0)  # strictly: every factor is positive


def test_fixed_points_and_direction() -> None:
    sizes = torch.tensor([0.6, 0.3, 0.1])  # c = (1.8, 0.9, 0.3): one over-, two under-sized clusters
    z = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.3, 0.3, 0.3]])
    out = balance_similarities(z, sizes, argmax_boost=1.0)
    assert out[0, 1] == pytest.approx(1.0) and out[0, 2] == pytest.approx(1.0)  # z = 1 fixed for small clusters
    assert out[1, 0] == pytest.approx(-1.0)  # z = −1 fixed for the large cluster
    assert out[2, 0] < 0.3 < out[2, 1] < out[2, 2]  # large pushed down, small pulled up, smaller pulled more


def test_balancing_flips_assignment_towards_small_cluster() -> None:
    sizes = torch.tensor([0.9, 0.1])
    z = torch.tensor([[0.5, 0.2]])
    assert z.argmax() == 0 and balance_similarities(z, sizes).argmax() == 1


def test_zero_size_does_not_give_nan() -> None:
    out = balance_similarities(torch.rand(4, 3), torch.tensor([0.5, 0.5, 0.0]))
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0


def test_update_is_ema_of_hard_assignment_histogram() -> None:
    b = ClusterBalancer(num_clusters=4, momentum=0.9)
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.8, 0.1, 0.05, 0.05], [0.0, 0.0, 0.1, 0.9]])
    hist = b.update(p)
    torch.testing.assert_close(hist, torch.tensor([0.5, 0.25, 0.0, 0.25]))
    torch.testing.assert_close(b.sizes, 0.9 * torch.full((4,), 0.25) + 0.1 * hist)
    torch.testing.assert_close(b.sizes.sum(), torch.tensor(1.0))


def test_update_averages_over_all_leading_dims() -> None:
    p = torch.zeros(2, 3, 5)
    p[0, :, 1] = 1
    p[1, :2, 4] = 1
    p[1, 2, 0] = 1
    torch.testing.assert_close(assignment_histogram(p), torch.tensor([1 / 6, 0.5, 0, 0, 1 / 3]))


def test_estimate_converges_to_assignment_shares() -> None:
    b = ClusterBalancer(num_clusters=3, momentum=0.99)
    p = torch.eye(3)[torch.tensor([0, 0, 0, 1])]  # shares (0.75, 0.25, 0)
    for _ in range(2000):
        b.update(p)
    torch.testing.assert_close(b.sizes, torch.tensor([0.75, 0.25, 0.0]), atol=1e-5, rtol=0)


def test_state_dict_round_trip() -> None:
    a = ClusterBalancer(num_clusters=8, momentum=0.5)
    a.update(torch.eye(8)[torch.tensor([1, 1, 2])])
    b = ClusterBalancer(num_clusters=8, momentum=0.5)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.sizes, b.sizes)
    assert "sizes" in a.state_dict()


def test_rejects_wrong_shapes_and_values() -> None:
    b = ClusterBalancer(num_clusters=4)
    with pytest.raises(ValueError):
        b.balance(torch.zeros(2, 5))
    with pytest.raises(ValueError):
        b.update(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        ClusterBalancer(num_clusters=4, momentum=1.0)
