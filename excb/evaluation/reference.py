"""What a run's accuracy means: the same kNN and linear probe on raw pixels and on the untrained network.

For a dataset and evaluation settings, two reference feature maps φ are evaluated exactly as the teacher's are
(weighted kNN, k and T of ``eval``; the L-BFGS linear probe), train split → test split:

- raw pixels: φ(x) = vec(plain(x)), the whole image at the global crop size, normalised by the dataset's mean
  and std (what the network sees at evaluation time), flattened;
- untrained network: φ(x) = backbone_θ₀(plain(x)), θ₀ the initial weights a run of this config starts from
  (``torch.manual_seed(train.seed)`` then the networks are built, as the learner does).

The scores are cached per dataset and settings in ``$EXCB_CACHE_DIR/reference/<sha256>.json`` (default
``~/.cache/excb``), so they are computed once per dataset, not once per run. They are made for the in-memory
evaluation (datasets whose decoded images fit in one process); a dataset evaluated with the Ray engine gets none.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from excb.config import ExcbConfig

__all__ = ["REFERENCE_KEYS", "cache_dir", "compute_reference_scores", "reference_key", "reference_lines",
           "reference_scores"]

CACHE_VERSION = 1  # bump when the definition of a reference score changes
REFERENCE_KEYS = ("raw_pixels_knn_top1", "raw_pixels_linear_top1", "random_init_knn_top1",
                  "random_init_linear_top1")


def cache_dir() -> Path:
    """``$EXCB_CACHE_DIR`` or ``~/.cache/excb``."""
    return Path(os.environ.get("EXCB_CACHE_DIR") or Path.home() / ".cache" / "excb")


def _dataset_identity(data_path: str) -> dict[str, Any]:
    """The path and, for prepared shards, their ``meta.json`` (row counts, source): a re-prepared dataset at
    the same path with other contents gets another key."""
    from excb.storage import exists, join, read_text

    meta = join(data_path, "meta.json")
    try:
        return {"path": data_path, "meta": json.loads(read_text(meta)) if exists(meta) else None}
    except (OSError, ValueError):
        return {"path": data_path, "meta": None}


def reference_key(cfg: ExcbConfig, data_path: str, limit: int | None, linear_probe: bool,
                  part: str = "random_init") -> str:
    """SHA-256 of everything a part's scores depend on: the dataset, the image settings, the kNN and probe settings,
    and for ``random_init`` also the network config (backbone, projector, prototypes) and the seed (``raw_pixels``
    does not depend on them, so runs that differ only there share it)."""
    spec: dict[str, Any] = {
        "version": CACHE_VERSION, "part": part, "data": _dataset_identity(data_path), "limit": limit,
        "image": [cfg.data.image_size, cfg.data.channels, list(cfg.data.mean), list(cfg.data.std),
                  cfg.augment.global_size],
        "knn": [cfg.eval.knn_k, cfg.eval.knn_temperature],
        "linear": [linear_probe, cfg.eval.linear_weight_decay, cfg.eval.linear_max_iter]}
    if part == "random_init":
        spec.update(model=asdict(cfg.model), seed=cfg.train.seed)
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def _pixels(augment: Any, images: Tensor, batch_size: int = 4096) -> Tensor:
    """vec(plain(x)) for uint8 images [N, C, H, W]: [N, C·S·S] float32."""
    return torch.cat([augment.plain(images[i:i + batch_size]).flatten(1) for i in range(0, len(images), batch_size)])


def _scores(prefix: str, ftr: Tensor, ytr: Tensor, fte: Tensor, yte: Tensor, cfg: ExcbConfig,
            linear_probe: bool) -> dict[str, float]:
    from excb.evaluation.metrics import knn_top1, linear_probe_top1

    out = {f"{prefix}_knn_top1": knn_top1(ftr, ytr, fte, yte, cfg.eval.knn_k, cfg.eval.knn_temperature)}
    if linear_probe:
        out[f"{prefix}_linear_top1"] = linear_probe_top1(ftr, ytr, fte, yte,
                                                         weight_decay=cfg.eval.linear_weight_decay,
                                                         max_iter=cfg.eval.linear_max_iter)
    return out


def _raw_pixel_scores(cfg: ExcbConfig, train_x: Tensor, ytr: Tensor, test_x: Tensor, yte: Tensor,
                      linear_probe: bool) -> dict[str, float]:
    from excb.method.augment import MultiCropAugment

    augment = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    return _scores("raw_pixels", _pixels(augment, train_x), ytr, _pixels(augment, test_x), yte, cfg, linear_probe)


def _random_init_scores(cfg: ExcbConfig, train_x: Tensor, ytr: Tensor, test_x: Tensor, yte: Tensor,
                        linear_probe: bool) -> dict[str, float]:
    from excb.evaluation.evaluate import extract_features
    from excb.method.augment import MultiCropAugment
    from excb.method.model import build_student_teacher

    augment = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.train.seed)
        _, untrained = build_student_teacher(cfg)
    finally:
        torch.random.set_rng_state(rng)
    ftr, _ = extract_features(untrained, augment, train_x)
    fte, _ = extract_features(untrained, augment, test_x)
    return _scores("random_init", ftr, ytr, fte, yte, cfg, linear_probe)


PARTS = {"raw_pixels": _raw_pixel_scores, "random_init": _random_init_scores}


def compute_reference_scores(cfg: ExcbConfig, train_x: Tensor, train_y: np.ndarray, test_x: Tensor,
                             test_y: np.ndarray, *, linear_probe: bool = True,
                             parts: tuple[str, ...] = tuple(PARTS)) -> dict[str, float]:
    """kNN top-1 (and linear-probe top-1) of raw pixels and of the untrained network (see the module docstring),
    from uint8 images [N, C, H, W] and labels; keys in :data:`REFERENCE_KEYS` (those of ``parts``)."""
    ytr, yte = torch.from_numpy(np.asarray(train_y)), torch.from_numpy(np.asarray(test_y))
    out: dict[str, float] = {}
    for part in parts:
        out.update(PARTS[part](cfg, train_x, ytr, test_x, yte, linear_probe))
    return out


def _cached(path: Path, part: str) -> dict[str, float] | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: compute
    if isinstance(cached, dict) and f"{part}_knn_top1" in cached:
        return {k: float(v) for k, v in cached.items() if k in REFERENCE_KEYS}
    return None


def _store(path: Path, scores: dict[str, float]) -> None:
    """Write atomically (a temporary file, then a rename); a read-only cache only loses the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(scores, indent=2))
        os.replace(tmp, path)
    except OSError as e:
        from excb import console

        console.info(f"reference scores not cached ({e})")


def reference_scores(cfg: ExcbConfig, data_path: str, train_x: Tensor, train_y: np.ndarray, test_x: Tensor,
                     test_y: np.ndarray, *, limit: int | None = None, linear_probe: bool = True) -> dict[str, float]:
    """:func:`compute_reference_scores`, each part read from the cache when this dataset and these settings were
    scored before (:func:`reference_key`), else computed and cached."""
    out: dict[str, float] = {}
    for part in PARTS:
        path = cache_dir() / "reference" / f"{reference_key(cfg, data_path, limit, linear_probe, part)}.json"
        scores = _cached(path, part)
        if scores is None:
            scores = compute_reference_scores(cfg, train_x, train_y, test_x, test_y, linear_probe=linear_probe,
                                              parts=(part,))
            _store(path, scores)
        out.update(scores)
    return out


def reference_lines(summary: dict[str, Any]) -> list[str]:
    """Lines for the end-of-run summary: the model's kNN / linear top-1 next to raw pixels and the untrained network,
    with the gain over raw pixels; none when the summary has no reference scores."""
    lines = []
    for metric, name in (("knn_top1", "kNN"), ("linear_top1", "linear probe")):
        raw, rand = summary.get(f"raw_pixels_{metric}"), summary.get(f"random_init_{metric}")
        if raw is None or rand is None or metric not in summary:
            continue
        lines.append(f"  {name} for reference: raw pixels {raw:.2f}%, untrained network {rand:.2f}% → "
                     f"pretraining adds {summary[metric] - raw:+.2f} points over raw pixels")
    return lines
