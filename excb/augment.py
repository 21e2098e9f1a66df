"""Multi-crop views made on the training device for a whole batch at once, each sample with its own random
parameters (crop box, flip, jitter factors, blur sigma, …) — no per-image Python loop.

Crop + resize + flip is one affine resampling (``affine_grid`` + bilinear ``grid_sample``); colour jitter is
brightness → contrast → saturation → hue in a fixed order (torchvision draws the order at random); hue is a
rotation of the chroma plane in YIQ space (a close, fast stand-in for torchvision's HSV hue shift).
Down-scaling uses bilinear sampling without antialiasing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from excb.config import AugmentConfig

_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)


def _bernoulli(n: int, p: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return (torch.rand(n, generator=gen) < p).to(device)


def random_resized_crop(x: Tensor, size: int, scale: tuple[float, float], flip_p: float,
                        gen: torch.Generator) -> Tensor:
    """Per-sample RandomResizedCrop (area fraction ~ U(scale), aspect ratio log-uniform in [3/4, 4/3]) and
    horizontal flip with probability ``flip_p``, resampled to ``size``×``size``: x [B, C, H, W] float."""
    b, dev = x.shape[0], x.device
    area = torch.rand(b, generator=gen) * (scale[1] - scale[0]) + scale[0]
    log_r = torch.rand(b, generator=gen) * (math.log(4 / 3) - math.log(3 / 4)) + math.log(3 / 4)
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=gen) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(dev, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """factor·a + (1 − factor)·b, clamped to [0, 1]; factor [B]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 1)


def _hue_rotate(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the chroma of RGB images by ``shift`` turns (∈ [−0.5, 0.5]) in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          device=x.device, dtype=x.dtype)
    from_yiq = torch.linalg.inv(to_yiq)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    ang = (shift * 2 * math.pi).to(x.dtype).view(-1, 1, 1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, yiq).clamp(0, 1)


def color_jitter(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """With probability ``jitter_p`` per sample: brightness, contrast (and for RGB saturation, hue) factors
    drawn per sample as in torchvision's ColorJitter; then grayscale with probability ``grayscale_p`` (RGB)."""
    b, dev = x.shape[0], x.device
    apply = _bernoulli(b, cfg.jitter_p, gen, dev).view(-1, 1, 1, 1)
    y = x
    if cfg.brightness > 0:
        y = (y * _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen, dev).view(-1, 1, 1, 1)).clamp(0, 1)
    if cfg.contrast > 0:
        mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = _blend(y, mean.expand_as(y), _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen, dev))
    if x.shape[1] == 3:
        if cfg.saturation > 0:
            y = _blend(y, _gray(y).expand_as(y), _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, gen, dev))
        if cfg.hue > 0:
            y = _hue_rotate(y, _uniform(b, -cfg.hue, cfg.hue, gen, dev))
    x = torch.where(apply, y, x)
    if x.shape[1] == 3 and cfg.grayscale_p > 0:
        gray = _bernoulli(b, cfg.grayscale_p, gen, dev).view(-1, 1, 1, 1)
        x = torch.where(gray, _gray(x).expand_as(x), x)
    return x


def gaussian_blur(x: Tensor, p: float, sigma: tuple[float, float], gen: torch.Generator) -> Tensor:
    """With probability ``p`` per sample, a separable Gaussian blur with σ ~ U(sigma) (kernel radius ⌈3σ_max⌉,
    reflect padding); one grouped convolution for the whole batch."""
    b, c, h, w = x.shape
    dev = x.device
    if p <= 0:
        return x
    radius = max(1, min(math.ceil(3 * sigma[1]), (min(h, w) - 1) // 2))
    sig = _uniform(b, sigma[0], sigma[1], gen, dev).to(x.dtype)
    blur = _bernoulli(b, p, gen, dev)
    t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sig[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    delta = (t == 0).to(x.dtype).expand_as(k)
    k = torch.where(blur[:, None], k, delta).repeat_interleave(c, dim=0)  # [B*C, 2r+1]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def solarize(x: Tensor, p: float, gen: torch.Generator, threshold: float = 0.5) -> Tensor:
    """With probability ``p`` per sample, invert pixels ≥ ``threshold``: x ← 1 − x there."""
    if p <= 0:
        return x
    apply = _bernoulli(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1 - x, x)


class MultiCropAugment:
    """Two global crops (scale (s_min, 1)) and ``num_local`` local crops (scale (local_min_scale, s_min)) of a
    uint8 batch [B, C, H, W], each normalised with the dataset mean/std. s_min is passed per call (its schedule
    advances per epoch)."""

    def __init__(self, cfg: AugmentConfig, mean: list[float], std: list[float]) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        blur = list(cfg.blur_p)
        if cfg.blur_mode == "authors":  # the released code's inversion: nominal p behaves as 1 − p
            blur = [1.0 - v for v in blur]
        self.global_blur = blur
        self.local_blur = 0.0 if cfg.blur_mode == "authors" else cfg.blur_p[0]

    def _normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def _view(self, x: Tensor, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
              gen: torch.Generator) -> Tensor:
        cfg = self.cfg
        v = random_resized_crop(x, size, scale, cfg.flip_p, gen)
        v = color_jitter(v, cfg, gen)
        v = gaussian_blur(v, blur_p, (cfg.blur_sigma[0], cfg.blur_sigma[1]), gen)
        v = solarize(v, solarize_p, gen)
        return self._normalise(v)

    def __call__(self, images: Tensor, crop_min_scale: float, gen: torch.Generator) -> list[Tensor]:
        """uint8 [B, C, H, W] → [global_1, global_2, local_1, …]: float tensors on the images' device."""
        cfg = self.cfg
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        views = [self._view(x, cfg.global_size, (crop_min_scale, 1.0), self.global_blur[i], cfg.solarize_p[i], gen)
                 for i in range(2)]
        local_scale = (cfg.local_min_scale, crop_min_scale)
        views += [self._view(x, cfg.local_size, local_scale, self.local_blur, 0.0, gen)
                  for _ in range(cfg.num_local)]
        return views

    def plain(self, images: Tensor) -> Tensor:
        """The whole image resized to the global crop size and normalised (evaluation, k-means input)."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.cfg.global_size or x.shape[-2] != self.cfg.global_size:
            x = F.interpolate(x, size=(self.cfg.global_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True)
        return self._normalise(x)
