"""Batched multi-crop views with per-sample random parameters (excb.method.augment)."""

from __future__ import annotations

import pytest
import torch

from excb.config import AugmentConfig
from excb.method.augment import (
    MultiCropAugment,
    gaussian_blur,
    random_resized_crop,
    sample_crop_boxes,
    solarize,
)


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
    # scale (1, 1) on a square image: a draw fits only with aspect ≈ 1 (w = h = 28), and torchvision's fallback
    # is the whole image too, so every crop is the whole image: the identity, or its mirror image with flip_p=1
    x = _images(4).float() / 255
    out = random_resized_crop(x, 28, (1.0, 1.0), 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    flipped = random_resized_crop(x, 28, (1.0, 1.0), 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


def _torchvision_boxes(h: int, w: int, scale: tuple[float, float], n: int) -> torch.Tensor:
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    return torch.tensor([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


@pytest.mark.parametrize("hw", [(200, 300), (300, 150), (96, 320), (64, 64)])
@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14)])
def test_crop_boxes_follow_torchvision_on_the_whole_image(hw: tuple[int, int], scale: tuple[float, float]) -> None:
    """Area fraction and aspect ratio of the sampled boxes have torchvision's RandomResizedCrop distribution on
    the original (here: non-square) image, fallbacks included (two-sample Kolmogorov-Smirnov tests)."""
    from scipy.stats import ks_2samp

    n = 4000
    ours = sample_crop_boxes(torch.tensor([hw] * n), scale, torch.Generator().manual_seed(1))
    ref = _torchvision_boxes(*hw, scale, n)
    h, w = hw
    for boxes in (ours, ref):  # (top, left, h, w), inside the image
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= h).all()
        assert (boxes[:, 1] + boxes[:, 3] <= w).all() and (boxes[:, 2:] > 0).all()
    area = [(b[:, 2] * b[:, 3]).double() / (h * w) for b in (ours, ref)]
    aspect = [torch.log(b[:, 3].double() / b[:, 2]) for b in (ours, ref)]
    top = [(b[:, 0].double() + b[:, 2] / 2) / h for b in (ours, ref)]  # box centres, relative
    for a, b in (area, aspect, top):
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3
    full = [((b[:, 2] == h) & (b[:, 3] == w)).double().mean() for b in (ours, ref)]
    assert abs(full[0] - full[1]) < 0.03  # the same share of whole-image crops (the fallback for wide images)


def test_crops_never_cover_the_canvas_padding() -> None:
    """Images padded into a canvas (``data.train_decode=fit``): every output pixel of every crop comes from the
    image, none from the padding, at any crop size (up- or down-sampling), flipped or not."""
    canvas = torch.zeros(64, 3, 40, 40)
    hw = torch.tensor([[40, 13], [9, 40], [25, 31], [40, 40]] * 16)
    for i, (h, w) in enumerate(hw.tolist()):
        canvas[i, :, :h, :w] = 0.75
    for size, scale in ((32, (0.14, 1.0)), (12, (0.05, 0.14)), (64, (0.5, 1.0))):
        out = random_resized_crop(canvas, size, scale, 0.5, torch.Generator().manual_seed(size), valid_hw=hw)
        assert out.shape == (64, 3, size, size)
        torch.testing.assert_close(out, torch.full_like(out, 0.75), atol=1e-6, rtol=0)


def test_views_of_padded_images_use_only_the_image() -> None:
    aug = MultiCropAugment(AugmentConfig(global_size=16, local_size=8, num_local=2, jitter_p=0.0, grayscale_p=0.0,
                                         blur_p=[0.0, 0.0], solarize_p=[0.0, 0.0]), [0.0], [1.0])
    images = torch.zeros(8, 1, 30, 30, dtype=torch.uint8)
    images[:, :, :10, :25] = 255
    views = aug(images, 0.3, torch.Generator().manual_seed(0), torch.tensor([[10, 25]] * 8))
    assert all(torch.allclose(v, torch.ones_like(v)) for v in views)


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
    # torchvision's RandomSolarize(threshold=128) on uint8: 128 is inverted, 127 is not
    pixels = torch.tensor([127.0, 128.0]).view(1, 1, 1, 2) / 255
    torch.testing.assert_close(solarize(pixels, 1.0, torch.Generator())[0, 0, 0], torch.tensor([127.0, 127.0]) / 255)


def test_blur_kernel_size_fixes_the_support() -> None:
    x = torch.zeros(4, 1, 31, 31)
    x[:, :, 15, 15] = 1.0
    out = gaussian_blur(x, 1.0, (2.0, 2.0), torch.Generator().manual_seed(0), kernel_size=9)
    support = out[0, 0] > 0
    assert support.any(dim=0).sum() == 9 and support.any(dim=1).sum() == 9  # radius 4, as torchvision's 9


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
