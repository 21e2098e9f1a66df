"""Typed run configuration: YAML file + ``section.key=value`` overrides, validated before anything starts.

A config has one section per concern (data, model, method, augment, optim, train, eval). Every key has a
default here, so a YAML file only lists what it changes. Unknown sections or keys and invalid values raise
:class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist | shards (any prepared Parquet shard folder/URI)
    path: str = "data/fashion_mnist"  # shard root (local path or s3://, gs:// URI)
    image_size: int = 28  # decoded size in pixels (images are resized/cropped to S×S on decode)
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    strict_decode: bool = False  # corrupt image bytes: False = skip and count, True = stop naming the row
    limit: int = 0  # use only the first N training rows (0 = all); for tests and quick runs
    mean: list[float] = field(default_factory=lambda: [0.286])
    std: list[float] = field(default_factory=lambda: [0.353])


@dataclass
class ModelConfig:
    backbone: str = "convnet"  # convnet | resnet18_small | resnet50 | vit_s16
    convnet_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    convnet_pool: int = 1  # ConvNet output: average-pool to a pool×pool grid (1 = global pooling)
    projector_hidden: int = 2048
    projector_out: int = 256
    predictor_hidden: int = 2048
    use_predictor: bool = True
    head_norm: str = "bn"  # bn (ResNet heads: BN + ReLU) | none (ViT heads: no BN, GELU)
    num_prototypes: int = 1024
    channels_last: bool = True


@dataclass
class MethodConfig:
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    balance_momentum: float = 0.999
    argmax_boost: float = 1.01
    ema_start: float = 0.996
    ema_end: float = 1.0
    kmeans_init: bool = True
    kmeans_samples: int = 20000  # images whose teacher projections seed k-means (several per prototype)
    kmeans_iters: int = 50


@dataclass
class AugmentConfig:
    global_size: int = 28
    local_size: int = 12
    num_local: int = 6
    crop_min_start: float = 0.26  # s_min at epoch 0 (global crops use scale (s_min, 1))
    crop_min_end: float = 0.14  # s_min at the last epoch (local crops use scale (local_min_scale, s_min))
    local_min_scale: float = 0.05
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])  # per global view; locals use the first
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    blur_mode: str = "nominal"  # nominal | authors (the released code's inverted probabilities, locals unblurred)
    solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.6  # for the global batch size below (not per 256)
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 1e-4
    weight_decay: float = 1e-4
    weight_decay_end: float = 1e-4
    prototype_wd_start_factor: float = 10.0
    prototype_wd_end_factor: float = 1.0
    grad_clip: float = 0.0  # 0 = off (the method uses none)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256  # global batch = per-worker batch × num_workers
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    torch_threads: int = 0  # 0 = all cores of the machine
    seed: int = 0
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    log_every_steps: int = 50


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    epoch_knn_train: int = 10000  # per-epoch kNN on a subset (0 disables); the final evaluation uses all rows
    epoch_knn_test: int = 2000
    final_eval: bool = True


@dataclass
class ExcbConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "ExcbConfig":
        validate(self)
        return self


BACKBONES = ("convnet", "resnet18_small", "resnet50", "vit_s16")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the declared field type, or raise naming the key."""
    origin = get_origin(hint)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _section_update(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(section))
    names = {f.name for f in fields(section)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}.{key}' (known: {', '.join(sorted(names))})")
        setattr(section, key, _coerce(value, hints[key], f"{prefix}.{key}"))


def from_dict(raw: dict[str, Any] | None) -> ExcbConfig:
    """Build a config from a nested mapping (sections → keys); unknown keys raise ConfigError."""
    cfg = ExcbConfig()
    sections = {f.name for f in fields(cfg)}
    for name, values in (raw or {}).items():
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}' (known: {', '.join(sorted(sections))})")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {values!r}")
        _section_update(getattr(cfg, name), values, name)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` → (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key '{path}' must be section.key (e.g. train.epochs=5)")
    return parts[0], parts[1], yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExcbConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        raw[section][key] = value
    return from_dict(raw).validate()


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: ExcbConfig) -> None:
    """Reject values that cannot work, naming the key (runs before Ray or any worker starts)."""
    d, m, me, a, o, t, e = cfg.data, cfg.model, cfg.method, cfg.augment, cfg.optim, cfg.train, cfg.eval
    _check(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels}")
    _check(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    _check(d.limit >= 0, "data.limit", "must be >= 0")
    _check(len(d.mean) == d.channels, "data.mean", f"needs {d.channels} values")
    _check(len(d.std) == d.channels and all(s > 0 for s in d.std), "data.std", f"needs {d.channels} positive values")
    _check(m.backbone in BACKBONES, "model.backbone", f"must be one of {BACKBONES}, got {m.backbone!r}")
    _check(m.convnet_pool >= 1, "model.convnet_pool", f"must be >= 1, got {m.convnet_pool}")
    _check(m.num_prototypes >= 2, "model.num_prototypes", f"must be >= 2, got {m.num_prototypes}")
    _check(m.head_norm in ("bn", "none"), "model.head_norm", "must be bn or none")
    for key in ("projector_hidden", "projector_out", "predictor_hidden"):
        _check(getattr(m, key) >= 1, f"model.{key}", "must be >= 1")
    _check(len(m.convnet_widths) >= 1 and all(w >= 1 for w in m.convnet_widths), "model.convnet_widths",
           "must be a non-empty list of positive widths")
    _check(me.teacher_temp > 0, "method.teacher_temp", f"must be > 0, got {me.teacher_temp}")
    _check(me.student_temp > 0, "method.student_temp", f"must be > 0, got {me.student_temp}")
    _check(0.0 <= me.balance_momentum < 1.0, "method.balance_momentum", f"must be in [0, 1), got {me.balance_momentum}")
    _check(me.argmax_boost >= 1.0, "method.argmax_boost", "must be >= 1 (1 disables the boost)")
    _check(0.0 <= me.ema_start <= me.ema_end <= 1.0, "method.ema_start", "need 0 <= ema_start <= ema_end <= 1")
    _check(me.kmeans_samples >= 1 and me.kmeans_iters >= 0, "method.kmeans_samples", "must be positive")
    _check(a.global_size >= 4 and a.local_size >= 4, "augment.global_size", "crop sizes must be >= 4")
    _check(a.num_local >= 0, "augment.num_local", "must be >= 0")
    _check(0 < a.crop_min_end <= 1 and 0 < a.crop_min_start <= 1, "augment.crop_min_start", "must be in (0, 1]")
    _check(0 < a.local_min_scale <= min(a.crop_min_start, a.crop_min_end), "augment.local_min_scale",
           "must be in (0, min(crop_min_start, crop_min_end)]")
    for key in ("flip_p", "jitter_p", "grayscale_p"):
        _check(0.0 <= getattr(a, key) <= 1.0, f"augment.{key}", "must be a probability in [0, 1]")
    for key in ("blur_p", "solarize_p"):
        vals = getattr(a, key)
        _check(len(vals) == 2 and all(0.0 <= v <= 1.0 for v in vals), f"augment.{key}",
               "must be two probabilities (one per global view)")
    _check(len(a.blur_sigma) == 2 and 0 < a.blur_sigma[0] <= a.blur_sigma[1], "augment.blur_sigma",
           "must be [min, max] with 0 < min <= max")
    _check(a.blur_mode in ("nominal", "authors"), "augment.blur_mode", "must be nominal or authors")
    _check(o.optimizer in ("sgd", "adamw"), "optim.optimizer", f"must be sgd or adamw, got {o.optimizer!r}")
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.num_workers >= 1, "train.num_workers", f"must be >= 1, got {t.num_workers}")
    _check(t.batch_size >= 2 and t.batch_size % t.num_workers == 0, "train.batch_size",
           f"must be >= 2 and divisible by train.num_workers ({t.num_workers}), got {t.batch_size}")
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
    _check(t.torch_threads >= 0, "train.torch_threads", "must be >= 0")
    _check(t.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 = retry forever)")
    _check(t.checkpoints_to_keep >= 1, "train.checkpoints_to_keep", "must be >= 1")
    _check(e.knn_k >= 1 and e.knn_temperature > 0, "eval.knn_k", "knn_k must be >= 1 and knn_temperature > 0")


def dump_yaml(cfg: ExcbConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
