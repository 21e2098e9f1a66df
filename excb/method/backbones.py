"""Backbones: a small ConvNet and a small-image ResNet-18 for CPU work; ResNet-50 and ViT-S/16 at paper scale; any
torchvision classifier by name (``torchvision:<model>``).

Each builder returns a module mapping images [B, C, H, W] to features [B, D] and sets ``module.out_dim = D``.

torchvision is imported by the builders that use it, not here: importing ``torchvision.models`` pulls in
``torch._dynamo`` (1.3–2 s per process on a 2-core machine). Training processes import ``torch._dynamo`` anyway
(``torch.optim`` does, on its first parameter group); processes that build a model but no optimizer — feature
actors, ``excb evaluate`` — are spared it for the ConvNet. The ViT lives in :mod:`excb.method.vit`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from excb.registry import Registry


class ConvNet(nn.Module):
    """Stages of two 3×3 conv–BN–ReLU layers, 2× down-sampling between stages, then average pooling to a
    ``pool``×``pool`` grid, flattened (``pool=1`` is global average pooling; a larger grid keeps coarse layout)."""

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


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet without its classifier; ``small_stem`` swaps the 7×7/2 conv + max-pool for 3×3/1.

    Build ``net`` with ``zero_init_residual=True`` (as :func:`build_backbone` does, like the released ExCB code):
    the last BN's γ of every residual branch starts at 0, so each block starts as the identity."""

    def __init__(self, net: nn.Module, in_channels: int, small_stem: bool) -> None:
        super().__init__()
        if small_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        if small_stem or in_channels != 3:  # a replaced stem is initialised like torchvision's other convolutions
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


TORCHVISION_PREFIX = "torchvision:"


def torchvision_classifiers() -> tuple[str, ...]:
    """Names of torchvision's image classification models (``torchvision.models.list_models``)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def remove_classifier(net: nn.Module) -> int:
    """Replace the last ``nn.Linear`` of a torchvision classifier (its class scores) by ``nn.Identity`` in place;
    returns that layer's ``in_features``, the size of the features the model now outputs. ValueError if the model
    has no linear layer (e.g. SqueezeNet's convolutional classifier)."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError(f"{type(net).__name__} has no final nn.Linear classifier to remove")
    name, linear = last
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return int(linear.in_features)


class TorchvisionClassifier(nn.Module):
    """Any torchvision classification model by name (``model.backbone=torchvision:convnext_tiny``), randomly
    initialised as torchvision initialises it, with its final linear classifier removed (:func:`remove_classifier`);
    images with ``in_channels`` ≠ 3 have their channels repeated (1 → 3) or must already be 3. State-dict keys are
    torchvision's under ``net.``."""

    def __init__(self, name: str, in_channels: int) -> None:
        super().__init__()
        import torchvision

        if name not in torchvision_classifiers():
            raise ValueError(f"{name!r} is not a torchvision classification model (torchvision.models.list_models)")
        if in_channels not in (1, 3):
            raise ValueError(f"torchvision backbones take 1 or 3 channels, got {in_channels}")
        self.name, self.in_channels = name, in_channels
        self.net = torchvision.models.get_model(name, weights=None)
        self.out_dim = remove_classifier(self.net)

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        y = self.net(x)
        if not isinstance(y, Tensor):  # e.g. GoogLeNet/Inception return auxiliary outputs in training mode
            raise TypeError(f"torchvision model {self.name} returned {type(y).__name__}, not a tensor of features")
        return y


BACKBONE_REGISTRY: Registry[nn.Module] = Registry("backbone")


@BACKBONE_REGISTRY.register("convnet")
def _convnet(in_channels: int, *, convnet_widths: tuple[int, ...] = (32, 64, 128), convnet_pool: int = 1) -> nn.Module:
    return ConvNet(in_channels, tuple(convnet_widths), convnet_pool)


@BACKBONE_REGISTRY.register("resnet18_small")
def _resnet18_small(in_channels: int) -> nn.Module:
    from torchvision.models import resnet18

    return TorchvisionResNet(resnet18(zero_init_residual=True), in_channels, small_stem=True)


@BACKBONE_REGISTRY.register("resnet50")
def _resnet50(in_channels: int) -> nn.Module:
    from torchvision.models import resnet50

    return TorchvisionResNet(resnet50(zero_init_residual=True), in_channels, small_stem=False)


@BACKBONE_REGISTRY.register("vit_s16")
def _vit_s16(in_channels: int, *, image_size: int = 224, drop_path: float = 0.0) -> nn.Module:
    from excb.method.vit import ViTBackbone

    return ViTBackbone(in_channels, image_size, drop_path=drop_path)


def build_backbone(name: str, in_channels: int, *, convnet_widths: tuple[int, ...] = (32, 64, 128),
                   convnet_pool: int = 1, image_size: int = 224, drop_path: float = 0.0) -> nn.Module:
    """Backbone by name: a registered one (convnet | resnet18_small | resnet50 | vit_s16), each given the options it
    takes, or ``torchvision:<model>`` for any torchvision classifier (:class:`TorchvisionClassifier`).
    ``drop_path``: ViT-S/16 only."""
    if drop_path and name != "vit_s16":
        raise ValueError(f"drop_path is implemented for vit_s16 only, not {name!r}")
    if name.startswith(TORCHVISION_PREFIX):
        return TorchvisionClassifier(name[len(TORCHVISION_PREFIX):], in_channels)
    return BACKBONE_REGISTRY.build(name, in_channels=in_channels, convnet_widths=convnet_widths,
                                   convnet_pool=convnet_pool, image_size=image_size, drop_path=drop_path)
