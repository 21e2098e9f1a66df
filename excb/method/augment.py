"""Multi-crop views made on the training device for a whole batch at once, each sample with its own random
parameters (crop box, flip, jitter factors, blur sigma, …) — no per-image Python loop.

Crop boxes follow torchvision's ``RandomResizedCrop`` exactly (:func:`sample_crop_boxes`, over each image's valid
region when images are padded into a canvas); crop + resize + flip is one affine resampling (``affine_grid`` +
bilinear ``grid_sample``, clamped to the box); colour jitter is
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


def sample_crop_boxes(valid_hw: Tensor, scale: tuple[float, float], gen: torch.Generator,
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for a whole batch, each image with its own valid size.

    For an image of H×W pixels, up to ``attempts`` draws of a target area A = H·W·U(scale) and an aspect ratio
    r = exp(U(log ratio)) give w = round(√(A·r)), h = round(√(A/r)); the first draw with 0 < w ≤ W and 0 < h ≤ H
    is kept, at top ~ U{0 … H − h}, left ~ U{0 … W − w}. When no draw fits, the centre crop of the whole image
    with its aspect ratio clamped to ``ratio``. ``valid_hw``: int [B, 2] (H, W); returns int64 [B, 4]
    (top, left, h, w), every box inside its image."""
    b = valid_hw.shape[0]
    hh = valid_hw[:, 0].to(torch.float64)
    ww = valid_hw[:, 1].to(torch.float64)
    u_area = torch.rand(b, attempts, generator=gen, dtype=torch.float64)
    u_ratio = torch.rand(b, attempts, generator=gen, dtype=torch.float64)
    target = (hh * ww)[:, None] * (scale[0] + u_area * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u_ratio * (log_hi - log_lo))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= ww[:, None]) & (h > 0) & (h <= hh[:, None])
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first fitting draw (0 if none)
    found = fits.any(dim=1)
    in_ratio = ww / hh
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(hh * ratio[1]), ww)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(ww / ratio[0]), hh)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    u_top, u_left = torch.rand(2, b, generator=gen, dtype=torch.float64)
    top = torch.where(found, torch.minimum(torch.floor(u_top * (hh - h + 1)), hh - h), torch.floor((hh - h) / 2))
    left = torch.where(found, torch.minimum(torch.floor(u_left * (ww - w + 1)), ww - w), torch.floor((ww - w) / 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def resample_boxes(x: Tensor, boxes: Tensor, size: int, flip: Tensor) -> Tensor:
    """Crop every image of ``x`` [B, C, H, W] to its box (int [B, 4]: top, left, h, w in pixels) and resize it to
    ``size``×``size`` (bilinear, no antialiasing), mirrored where ``flip`` [B] is true: one ``affine_grid`` +
    ``grid_sample`` for the batch. Sample points are clamped to the box's pixel centres, so a crop never reads a
    pixel outside its box (the canvas padding around an image included): the same as cropping, then resizing."""
    b, _, hc, wc = x.shape
    top, left, h, w = boxes.to(torch.float64).unbind(1)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w / wc * torch.where(flip.cpu(), -1.0, 1.0).to(torch.float64)
    theta[:, 0, 2] = (2 * left + w) / wc - 1
    theta[:, 1, 1] = h / hc
    theta[:, 1, 2] = (2 * top + h) / hc - 1
    lo = torch.stack([(2 * left + 1) / wc - 1, (2 * top + 1) / hc - 1], dim=1)
    hi = torch.stack([(2 * (left + w) - 1) / wc - 1, (2 * (top + h) - 1) / hc - 1], dim=1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    lo, hi = lo.to(x.device, x.dtype)[:, None, None, :], hi.to(x.device, x.dtype)[:, None, None, :]
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def full_boxes(x: Tensor) -> Tensor:
    """Valid size (H, W) of every image of a batch that fills its canvas: int64 [B, 2]."""
    return torch.tensor([x.shape[-2], x.shape[-1]], dtype=torch.int64).expand(x.shape[0], 2)


def random_resized_crop(x: Tensor, size: int, scale: tuple[float, float], flip_p: float,
                        gen: torch.Generator, valid_hw: Tensor | None = None) -> Tensor:
    """Per-sample RandomResizedCrop (torchvision's box distribution, :func:`sample_crop_boxes`, over each image's
    valid top-left H×W region of the canvas, the whole canvas by default) and horizontal flip with probability
    ``flip_p``, resampled to ``size``×``size``: x [B, C, H, W] float."""
    valid_hw = full_boxes(x) if valid_hw is None else valid_hw.cpu()
    boxes = sample_crop_boxes(valid_hw, scale, gen)
    flip = torch.rand(x.shape[0], generator=gen) < flip_p
    return resample_boxes(x, boxes, size, flip)


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


def gaussian_blur(x: Tensor, p: float, sigma: tuple[float, float], gen: torch.Generator,
                  kernel_size: int = 0) -> Tensor:
    """With probability ``p`` per sample, a separable Gaussian blur with σ ~ U(sigma), kernel radius ⌈3σ_max⌉
    (or (kernel_size − 1)/2 for an odd ``kernel_size``; the released code uses torchvision's kernel of 9) and
    reflect padding; one grouped convolution for the whole batch."""
    b, c, h, w = x.shape
    dev = x.device
    if p <= 0:
        return x
    wanted = (kernel_size - 1) // 2 if kernel_size > 0 else math.ceil(3 * sigma[1])
    radius = max(1, min(wanted, (min(h, w) - 1) // 2))
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


def solarize(x: Tensor, p: float, gen: torch.Generator, threshold: float = 128 / 255) -> Tensor:
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
              gen: torch.Generator, valid_hw: Tensor | None) -> Tensor:
        cfg = self.cfg
        v = random_resized_crop(x, size, scale, cfg.flip_p, gen, valid_hw)
        v = color_jitter(v, cfg, gen)
        v = gaussian_blur(v, blur_p, (cfg.blur_sigma[0], cfg.blur_sigma[1]), gen, cfg.blur_kernel_size)
        v = solarize(v, solarize_p, gen, cfg.solarize_threshold)
        return self._normalise(v)

    def __call__(self, images: Tensor, crop_min_scale: float, gen: torch.Generator,
                 valid_hw: Tensor | None = None) -> list[Tensor]:
        """uint8 [B, C, H, W] → [global_1, global_2, local_1, …]: float tensors on the images' device.

        ``valid_hw`` (int [B, 2], optional): each image's size (H, W) at the top-left of its padded canvas
        (``data.train_decode=fit``); crops are drawn inside it only. None: every image fills its canvas."""
        cfg = self.cfg
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        views = [self._view(x, cfg.global_size, (crop_min_scale, 1.0), self.global_blur[i], cfg.solarize_p[i], gen,
                            valid_hw)
                 for i in range(2)]
        local_scale = (cfg.local_min_scale, crop_min_scale)
        views += [self._view(x, cfg.local_size, local_scale, self.local_blur, 0.0, gen, valid_hw)
                  for _ in range(cfg.num_local)]
        return views

    def plain(self, images: Tensor) -> Tensor:
        """The whole image resized to the global crop size and normalised (evaluation, k-means input)."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.cfg.global_size or x.shape[-2] != self.cfg.global_size:
            x = F.interpolate(x, size=(self.cfg.global_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True)
        return self._normalise(x)
