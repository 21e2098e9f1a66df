"""``excb export``: the teacher backbone of a run's newest good checkpoint as a plain state dict for use outside
excb.

The export directory (default ``RUN_DIR/export``) holds, each written atomically (temporary file + move):

- ``backbone.pt``: ``torch.save`` of a ``{name: tensor}`` dict (load with ``torch.load(..., weights_only=True)``).
  ResNets use torchvision's key names (excb's ``TorchvisionResNet`` prefix ``net.`` stripped), so the dict loads
  with ``strict=True`` into ``torchvision.models.resnet50()`` / ``resnet18()`` after these changes:
  ``fc = nn.Identity()`` always; ``resnet18_small``: ``conv1 = nn.Conv2d(C, 64, 3, stride=1, padding=1,
  bias=False)`` and ``maxpool = nn.Identity()`` (3×3 stem, no max-pool); ``resnet50`` with C ≠ 3 channels:
  ``conv1 = nn.Conv2d(C, 64, 7, stride=2, padding=3, bias=False)``. ``convnet`` and ``vit_s16`` keep the key
  names of :func:`excb.method.backbones.build_backbone` (``build_backbone(name, C, convnet_widths=…, convnet_pool=…,
  image_size=…)``).
- ``export.json``: backbone, channels, image_size (the global crop size the backbone saw), mean, std,
  feature_dim, the ConvNet shape, the torchvision constructor and the changes above, and the source checkpoint.
- ``features.py``: a copy of :mod:`excb.evaluation.standalone_features` (torch and torchvision only) with
  ``load_backbone(path)`` and ``extract_features(model, images)`` (resize to image_size, normalise, forward).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from excb.config import ExcbConfig
from excb.evaluation import standalone_features
from excb.storage import atomic_write_bytes, join, resolve_fs, write_text

WEIGHTS_FILE = standalone_features.WEIGHTS_FILE
META_FILE = standalone_features.META_FILE
FEATURES_FILE = "features.py"
EXPORT_DIR = "export"
FORMAT = "excb-backbone/1"
RESNETS = {"resnet18_small": "resnet18", "resnet50": "resnet50"}


class ExportError(RuntimeError):
    """The checkpoint holds no usable teacher backbone."""


def backbone_state_dict(teacher_state: Mapping[str, Tensor], backbone: str) -> dict[str, Tensor]:
    """The teacher's ``backbone.*`` tensors under the target naming: torchvision's for ResNets (``backbone.net.``
    stripped), :func:`excb.method.backbones.build_backbone`'s for the others (``backbone.`` stripped); contiguous
    copies."""
    prefix = "backbone.net." if backbone in RESNETS or backbone.startswith("torchvision:") else "backbone."
    keys = [k for k in teacher_state if k.startswith("backbone.")]
    if not keys:
        raise ExportError("the checkpoint's teacher has no backbone.* tensors")
    stray = [k for k in keys if not k.startswith(prefix)]
    if stray:
        raise ExportError(f"unexpected teacher backbone keys for {backbone}: {stray[:3]}")
    return {k[len(prefix):]: teacher_state[k].detach().cpu().clone().contiguous() for k in keys}


def _torchvision_recipe(cfg: ExcbConfig) -> dict[str, Any] | None:
    """Constructor and the changes that make a torchvision ResNet match the exported state dict."""
    name, c = cfg.model.backbone, cfg.data.channels
    if name.startswith("torchvision:"):
        changes = ["the last torch.nn.Linear (class scores) = torch.nn.Identity()"]
        if c == 1:
            changes.append("input: one-channel images repeated to three channels")
        return {"constructor": f"torchvision.models.get_model({name.split(':', 1)[1]!r})", "changes": changes}
    if name not in RESNETS:
        return None
    changes = ["fc = torch.nn.Identity()"]
    if name == "resnet18_small":
        changes += [f"conv1 = torch.nn.Conv2d({c}, 64, 3, stride=1, padding=1, bias=False)",
                    "maxpool = torch.nn.Identity()"]
    elif c != 3:
        changes.append(f"conv1 = torch.nn.Conv2d({c}, 64, 7, stride=2, padding=3, bias=False)")
    return {"constructor": f"torchvision.models.{RESNETS[name]}()", "changes": changes}


def export_meta(cfg: ExcbConfig, feature_dim: int, *, epoch: int, step: int, checkpoint: str) -> dict[str, Any]:
    """The ``export.json`` record of a run's backbone."""
    m = cfg.model
    return {
        "format": FORMAT,
        "backbone": m.backbone,
        "weights": WEIGHTS_FILE,
        "channels": cfg.data.channels,
        "image_size": cfg.augment.global_size,
        "data_image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "feature_dim": int(feature_dim),
        "convnet_widths": list(m.convnet_widths),
        "convnet_pool": m.convnet_pool,
        "torchvision": _torchvision_recipe(cfg),
        "build_backbone": {"name": m.backbone, "in_channels": cfg.data.channels,
                           "convnet_widths": list(m.convnet_widths), "convnet_pool": m.convnet_pool,
                           "image_size": cfg.augment.global_size},
        "epoch": epoch,
        "step": step,
        "checkpoint": checkpoint,
    }


def export_run(run_dir: str, out_dir: str | None = None) -> dict[str, Any]:
    """Export the teacher backbone of ``run_dir``'s newest checkpoint that verifies into ``out_dir`` (default
    ``RUN_DIR/export``; local path or URI). The weights are checked to load with ``strict=True`` into the
    standalone model before anything is written. Returns export.json's record plus the written ``paths``."""
    from excb.config import from_dict
    from excb.rundir.checkpoint import list_checkpoints, load_latest

    state, where = load_latest(list_checkpoints(run_dir))
    cfg = from_dict(state["config"])
    weights = backbone_state_dict(state["teacher"], cfg.model.backbone)
    meta = export_meta(cfg, 0, epoch=int(state["epoch"]), step=int(state["step"]), checkpoint=where)
    model = standalone_features.build_model(meta)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(f"teacher backbone of {where} does not match {cfg.model.backbone}: {e}") from e
    with torch.no_grad():
        model.eval()
        size = cfg.augment.global_size
        blank = torch.zeros(1, cfg.data.channels, size, size, dtype=torch.uint8)
        meta["feature_dim"] = int(model(standalone_features.preprocess(blank, meta)).shape[1])

    out = out_dir or join(run_dir, EXPORT_DIR)
    buf = io.BytesIO()
    torch.save(weights, buf)
    fs, path = resolve_fs(join(out, WEIGHTS_FILE))
    atomic_write_bytes(fs, path, buf.getvalue())
    write_text(join(out, FEATURES_FILE), Path(standalone_features.__file__).read_text())
    write_text(join(out, META_FILE), json.dumps(meta, indent=2) + "\n")
    return {**meta, "paths": [join(out, n) for n in (WEIGHTS_FILE, FEATURES_FILE, META_FILE)]}
