"""Batched multi-crop views with per-sample random parameters (excb.augment)."""

from __future__ import annotations

import pytest
import torch

from excb.augment import MultiCropAugment, gaussian_blur, random_resized_crop, solarize
from excb.config import AugmentConfig


def _images(b: int = 16, c: int = 1, s: int = 28) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_views_shapes_and_count() -> None:
    cfg = AugmentConfig(global_size=24, local_size=12, num_local=6)
    views = MultiCropAugment(cfg, [0.5], [0.25])(_images(), 0.3, torch.Generator().manual_seed(0))
    assert len(views) == 8
    assert all(v.shape == (16, 1, 24, 24) for v in views[:2])
    assert all(v.shape == (16, 1, 12, 12) for v in views[2:])
    assert all(v.dtype == torch.float32 for v in views)


def test_each_sample_gets_its_own_crop() -> None:
    x = _images(1).expand(32, -1, -1, -1).float() / 255  # the same image 32 times
    out = random_resized_crop(x, 28, (0.1, 0.5), 0.5, torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 1e-3  # all 32 views differ


def test_full_scale_crop_without_flip_is_identity() -> None:
    x = _images(4).float() / 255
    out = random_resized_crop(x, 28, (1.0, 1.0), 0.0, torch.Generator().manual_seed(0))
    # ratio is still random, so only a crop with ratio≈1 is the identity; check the flipped variant instead
    flipped = random_resized_crop(x, 28, (1.0, 1.0), 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, out.flip(-1), atol=1e-5, rtol=0)


def test_views_are_reproducible_with_the_same_generator() -> None:
    aug = MultiCropAugment(AugmentConfig(global_size=28, local_size=12, num_local=2), [0.5], [0.25])
    a = aug(_images(), 0.2, torch.Generator().manual_seed(3))
    b = aug(_images(), 0.2, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_blur_per_sample_probability_and_mass() -> None:
    x = torch.zeros(64, 1, 15, 15)
    x[:, :, 7, 7] = 1.0
    out = gaussian_blur(x, 0.5, (1.0, 1.0), torch.Generator().manual_seed(0))
    blurred = out[:, 0, 7, 7] < 0.99
    assert 10 < int(blurred.sum()) < 54  # roughly half the samples
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), torch.ones(64), atol=1e-4, rtol=0)
    assert torch.equal(out[~blurred], x[~blurred])


def test_solarize_inverts_bright_pixels() -> None:
    x = torch.tensor([0.2, 0.7]).view(1, 1, 1, 2).expand(4, 1, 1, 2)
    out = solarize(x, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.2, 0.3]))


def test_rgb_jitter_and_grayscale_keep_range() -> None:
    aug = MultiCropAugment(AugmentConfig(global_size=16, local_size=8, num_local=1, grayscale_p=0.5),
                           [0.0] * 3, [1.0] * 3)
    views = aug(_images(8, 3, 32), 0.3, torch.Generator().manual_seed(0))
    for v in views:
        assert v.min() >= 0 and v.max() <= 1  # mean 0, std 1: normalisation is the identity here


@pytest.mark.parametrize("mode,expected", [("nominal", ([1.0, 0.1], 1.0)), ("authors", ([0.0, 0.9], 0.0))])
def test_blur_modes(mode: str, expected: tuple[list[float], float]) -> None:
    aug = MultiCropAugment(AugmentConfig(blur_mode=mode), [0.5], [0.25])
    assert aug.global_blur == pytest.approx(expected[0]) and aug.local_blur == expected[1]
