"""The images the linear evaluation sees.

Training: torchvision's RandomResizedCrop box distribution (area scale in ``crop_scale``, aspect ratio in
(3/4, 4/3)) over each image's whole valid region (decoded with ``train_decode=fit``: the photo whole, longer side
at ``data.image_size``), resampled to ``crop_size``, flipped horizontally with probability ``flip_p``.
Evaluation: the decoded image (shorter side at ``data.image_size``, centre square) resized to ``eval_resize`` and
centre-cropped to ``eval_crop``, i.e. resize-then-centre-crop of the photo. Both normalised with the dataset mean
and standard deviation: x̂ = (x / 255 − μ) / σ per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from excb.linear.config import LinearConfig
from excb.method.augment import random_resized_crop


def _normalise(x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def train_view(images: Tensor, valid_hw: Tensor | None, cfg: LinearConfig, mean: list[float], std: list[float],
               gen: torch.Generator) -> Tensor:
    """uint8 [B, C, S, S] → float [B, C, crop, crop]: random resized crop + flip, normalised."""
    x = images.float().div_(255.0)
    lo, hi = cfg.crop_scale
    return _normalise(random_resized_crop(x, cfg.crop_size, (lo, hi), cfg.flip_p, gen, valid_hw), mean, std)


def eval_view(images: Tensor, cfg: LinearConfig, mean: list[float], std: list[float]) -> Tensor:
    """uint8 [B, C, S, S] → float [B, C, eval_crop, eval_crop]: resize to eval_resize, centre crop, normalised."""
    x = images.float().div_(255.0)
    if x.shape[-1] != cfg.eval_resize or x.shape[-2] != cfg.eval_resize:
        x = F.interpolate(x, size=(cfg.eval_resize, cfg.eval_resize), mode="bilinear", align_corners=False,
                          antialias=True)
    top = (cfg.eval_resize - cfg.eval_crop) // 2
    x = x[..., top:top + cfg.eval_crop, top:top + cfg.eval_crop]
    return _normalise(x, mean, std)
