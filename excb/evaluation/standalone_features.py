"""Standalone feature extractor for a backbone exported by ``excb export`` (imports only torch and torchvision).

``excb export`` copies this file as ``features.py`` next to ``backbone.pt`` (a plain state dict) and
``export.json`` (backbone name, channels, image size, mean, std, feature dim)::

    from features import load_backbone, extract_features
    model = load_backbone("EXPORT_DIR")                 # or "EXPORT_DIR/backbone.pt"
    feats = extract_features(model, images)             # images: uint8 [N, C, H, W] in 0..255, or float in [0, 1]

Preprocessing is excb's evaluation view: x ← images / 255 (uint8 only), resized to image_size × image_size
(bilinear, antialiased, align_corners=False) when the size differs, then x ← (x − mean_c) / std_c per channel.
The features are the backbone's output [N, feature_dim] (pooled ResNet / ConvNet features, ViT class token).

Models, by ``export.json``'s ``backbone``:

- ``resnet18_small``: ``torchvision.models.resnet18()`` with ``conv1 = Conv2d(C, 64, 3, stride=1, padding=1,
  bias=False)``, ``maxpool = Identity()``, ``fc = Identity()``;
- ``resnet50``: ``torchvision.models.resnet50()`` with ``fc = Identity()`` and, for C ≠ 3 input channels,
  ``conv1 = Conv2d(C, 64, 7, stride=2, padding=3, bias=False)``;
- ``convnet``: the ConvNet below (excb.method.backbones.ConvNet);
- ``torchvision:<model>``: ``torchvision.models.get_model("<model>")`` with its last ``nn.Linear`` (the class
  scores) replaced by ``Identity()``; one-channel images are repeated to three channels before it;
- ``vit_s16``: ``torchvision`` ``VisionTransformer`` (patch 16, 12 layers, 6 heads, width 384, MLP 1536) at
  ``image_size`` under the attribute ``vit``, ``heads = Identity()`` and, for C ≠ 3, ``conv_proj = Conv2d(C, 384,
  16, stride=16)``; its output is the class token.

``python features.py EXPORT_DIR`` loads the export and prints the feature shape of one blank image.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.vision_transformer import VisionTransformer

META_FILE = "export.json"
WEIGHTS_FILE = "backbone.pt"


class ConvNet(nn.Module):
    """Stages of two 3×3 conv–BN–ReLU layers, 2× max-pool between stages, average-pool to pool × pool, flatten."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128), pool: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.pool = pool
        self.out_dim = c * pool * pool

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), self.pool), 1)


class ViTS16(nn.Module):
    """ViT-S/16 at a fixed input size returning the class token (state-dict keys ``vit.*``)."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.vit = VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=6,
                                     hidden_dim=384, mlp_dim=1536)
        if in_channels != 3:
            self.vit.conv_proj = nn.Conv2d(in_channels, 384, kernel_size=16, stride=16)
        self.vit.heads = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(x)


def remove_last_linear(net: nn.Module) -> None:
    """Replace the last ``nn.Linear`` of a torchvision classifier by ``nn.Identity`` (as excb's backbone does)."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The (untrained) module that the exported state dict loads into with ``strict=True``."""
    name, c = meta["backbone"], int(meta["channels"])
    if name.startswith("torchvision:"):
        import torchvision

        net = torchvision.models.get_model(name.split(":", 1)[1], weights=None)
        remove_last_linear(net)
        return net
    if name == "convnet":
        return ConvNet(c, tuple(int(w) for w in meta["convnet_widths"]), int(meta["convnet_pool"]))
    if name == "resnet18_small":
        net = resnet18()
        net.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        return net
    if name == "resnet50":
        net = resnet50()
        if c != 3:
            net.conv1 = nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        return net
    if name == "vit_s16":
        return ViTS16(c, int(meta["image_size"]))
    raise ValueError(f"unknown backbone {name!r}")


def _paths(path: str) -> tuple[str, str]:
    """(weights file, export.json) for an export directory or its weights file."""
    if os.path.isdir(path):
        return os.path.join(path, WEIGHTS_FILE), os.path.join(path, META_FILE)
    return path, os.path.join(os.path.dirname(os.path.abspath(path)), META_FILE)


def load_backbone(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load an exported backbone (directory or ``backbone.pt`` with ``export.json`` beside it) in eval mode;
    the export's metadata is kept as ``model.excb_export`` for :func:`extract_features`."""
    weights, meta_path = _paths(path)
    with open(meta_path) as f:
        meta = json.load(f)
    model = build_model(meta)
    state = torch.load(weights, map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    model.excb_export = meta
    return model.to(map_location).eval()


def preprocess(images: Tensor, meta: dict[str, Any]) -> Tensor:
    """uint8 images (0..255) or floats in [0, 1], [N, C, H, W] → resized, normalised float32 input."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    size = int(meta["image_size"])
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(meta["mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if str(meta["backbone"]).startswith("torchvision:") and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # torchvision models take three channels
    return x


@torch.no_grad()
def extract_features(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features [N, feature_dim] (float32, CPU) of images [N, C, H, W] (uint8 0..255 or float in [0, 1]),
    computed in batches on the model's device in eval mode."""
    meta = model.excb_export
    if images.ndim != 4 or images.shape[1] != int(meta["channels"]):
        raise ValueError(f"expected images [N, {meta['channels']}, H, W], got shape {tuple(images.shape)}")
    model.eval()
    device = next(model.parameters()).device
    out = [model(preprocess(images[i:i + batch_size].to(device), meta)).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, int(meta["feature_dim"]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} EXPORT_DIR")
    m = load_backbone(sys.argv[1])
    s = m.excb_export
    blank = torch.zeros(1, int(s["channels"]), int(s["image_size"]), int(s["image_size"]), dtype=torch.uint8)
    print(f"{s['backbone']}: features {tuple(extract_features(m, blank).shape)}")
