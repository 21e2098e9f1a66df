"""Typed run configuration: YAML file + ``section.key=value`` overrides, validated before anything starts.

A config has one section per concern (data, model, method, augment, optim, train, eval, storage). Every key has a
default here, so a YAML file only lists what it changes. Unknown sections or keys and invalid values raise
:class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist (shards prepared on first use) | any other name (data must exist)
    path: str = "data/fashion_mnist"  # dataset root (local path or s3://, gs:// URI)
    format: str = "shards"  # shards (Parquet, `excb prepare`) | image_folder (train/<class>/*.jpg) | webdataset (train/*.tar)
    materialize: bool | str = "auto"  # keep the decoded train split in Ray's object store: true | false (stream:
    #   read + decode every epoch) | auto (true when it takes under a quarter of the object store)
    train_rows: int = 0  # streamed image_folder/webdataset: train images if known (skips counting them); 0 = count
    image_size: int = 28  # decoded size in pixels: training canvases and evaluation images are S×S
    train_decode: str = "fit"  # training images: fit (whole image, longer side resized to S, aspect kept, padded
    #   into the S×S canvas; crops are drawn from the whole image, as torchvision's RandomResizedCrop on the
    #   original) | centre_crop (shorter side to S, centre S×S kept: crops never see the cut-off sides).
    #   Evaluation always decodes centre_crop (resize + centre crop, as the released kNN/linear transforms).
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
    projector_batching: str = "joint"  # joint (released code: one projector pass over all crops, BN statistics
    #   over global and local crops together) | per_size (ablation: one pass and BN statistics per crop size)
    drop_path: float = 0.0  # vit_s16 only: stochastic depth of the student (linear over depth); the teacher gets 0
    num_prototypes: int = 1024
    channels_last: bool = True


@dataclass
class MethodConfig:
    balancer: str = "excb"  # excb | centering (DINO) | sinkhorn (SwAV) | none — baselines for comparisons
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    balance_momentum: float = 0.999
    argmax_boost: float = 1.01
    ema_start: float = 0.996
    ema_end: float = 1.0
    kmeans_init: bool = True
    kmeans_samples: int = 20000  # images whose teacher projections seed k-means (several per prototype)
    kmeans_iters: int = 50
    center_momentum: float = 0.9  # balancer=centering: EMA momentum of DINO's centre
    sinkhorn_epsilon: float = 0.05  # balancer=sinkhorn: SwAV's ε
    sinkhorn_iters: int = 3  # balancer=sinkhorn: Sinkhorn-Knopp iterations


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
    blur_kernel_size: int = 0  # 0 = radius ceil(3 sigma_max); an odd size fixes the kernel (released code: 9)
    solarize_threshold: float = 0.50196  # invert pixels >= this (128/255, torchvision's RandomSolarize(128))
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
    num_workers: int | list[int] = 1  # N, or [min, max] for elastic training (Ray Train resizes within the range)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra custom resources per worker
    elastic_resize_interval_s: float = 60.0  # elastic runs: how often Ray Train considers growing the group
    torch_threads: int = 0  # 0 = all cores of the machine
    precision: str = "fp32"  # fp32 | bf16 (autocast for the forward passes; optimiser state stays fp32) | auto
    #   (bf16 on accelerators that support it, fp32 elsewhere)
    seed: int = 0
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    log_every_steps: int = 50
    record_sample_ids: bool = False  # audit: write the ids each rank consumed per epoch to RUN/sample_ids/
    compile: bool = False  # torch.compile the student and teacher backbones (in place, before DDP)
    max_steps_per_epoch: int = 0  # cap on the steps of an epoch (0 = a full pass); benchmarks, smoke runs

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def per_worker_batch(self) -> int:
        """Fixed per-worker batch: ``batch_size`` is the global batch at ``max_workers`` workers."""
        return self.batch_size // self.max_workers


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    epoch_knn_train: int = 10000  # per-epoch kNN on a subset (0 disables); the final evaluation uses all rows
    epoch_knn_test: int = 2000
    final_eval: bool = True
    linear_probe: bool = True  # final evaluation: linear probe on frozen features (never per epoch)
    linear_weight_decay: float = 1e-4  # λ of the probe's (λ/2)‖W‖² on standardised features
    linear_max_iter: int = 100  # L-BFGS iterations of the probe


@dataclass
class StorageConfig:
    """Object storage (s3://, gs://). Empty values fall back to the standard environment variables
    (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, GOOGLE_APPLICATION_CREDENTIALS).
    Credentials given here are never logged and are redacted in the run's saved config."""

    endpoint_url: str = ""  # S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO, moto, R2, ...)
    region: str = ""
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 60.0
    read_retries: int = 3  # attempts per shard read before the shard is reported by name


SECRET_KEYS = ("access_key_id", "secret_access_key")


@dataclass
class ExcbConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "ExcbConfig":
        validate(self)
        return self


BACKBONES = ("convnet", "resnet18_small", "resnet50", "vit_s16")
DATA_FORMATS = ("shards", "image_folder", "webdataset")
BALANCERS = ("excb", "centering", "sinkhorn", "none")
TRAIN_DECODES = ("fit", "centre_crop")
RELEASED_BLUR_P = (1.0, 0.1)  # the released code's per-global-view blur list (configs/main_config.yaml: p_blur)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the declared field type, or raise naming the key."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):  # int | list[int]: a list takes the list form
        options = get_args(hint)
        want_list = isinstance(value, (list, tuple))
        chosen = next((h for h in options if isinstance(h, type) and type(value) is h), None)  # bool | str
        if chosen is None:
            chosen = next((h for h in options if (get_origin(h) is list) == want_list), options[0])
        return _coerce(value, chosen, key)
    if origin is dict:
        _kt, vt = get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
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
    _check(d.format in DATA_FORMATS, "data.format", f"must be one of {DATA_FORMATS}, got {d.format!r}")
    _check(d.train_decode in TRAIN_DECODES, "data.train_decode", f"must be one of {TRAIN_DECODES}, got {d.train_decode!r}")
    _check(d.materialize in (True, False, "auto"), "data.materialize", f"must be true, false or auto, got {d.materialize!r}")
    _check(d.train_rows >= 0, "data.train_rows", "must be >= 0 (0 = count)")
    _check(d.dataset != "fashion_mnist" or d.format == "shards", "data.format",
           "fashion_mnist is prepared as shards: use data.format=shards (or name the dataset differently)")
    _check(len(d.mean) == d.channels, "data.mean", f"needs {d.channels} values")
    _check(len(d.std) == d.channels and all(s > 0 for s in d.std), "data.std", f"needs {d.channels} positive values")
    _check(m.backbone in BACKBONES, "model.backbone", f"must be one of {BACKBONES}, got {m.backbone!r}")
    _check(m.convnet_pool >= 1, "model.convnet_pool", f"must be >= 1, got {m.convnet_pool}")
    _check(m.num_prototypes >= 2, "model.num_prototypes", f"must be >= 2, got {m.num_prototypes}")
    _check(m.head_norm in ("bn", "none"), "model.head_norm", "must be bn or none")
    _check(m.projector_batching in ("joint", "per_size"), "model.projector_batching", "must be joint or per_size")
    _check(0.0 <= m.drop_path < 1.0, "model.drop_path", f"must be in [0, 1), got {m.drop_path}")
    _check(m.drop_path == 0.0 or m.backbone == "vit_s16", "model.drop_path", "only the vit_s16 backbone has drop-path")
    for key in ("projector_hidden", "projector_out", "predictor_hidden"):
        _check(getattr(m, key) >= 1, f"model.{key}", "must be >= 1")
    _check(len(m.convnet_widths) >= 1 and all(w >= 1 for w in m.convnet_widths), "model.convnet_widths",
           "must be a non-empty list of positive widths")
    _check(me.balancer in BALANCERS, "method.balancer", f"must be one of {BALANCERS}, got {me.balancer!r}")
    _check(0.0 <= me.center_momentum < 1.0, "method.center_momentum", "must be in [0, 1)")
    _check(me.sinkhorn_epsilon > 0 and me.sinkhorn_iters >= 1, "method.sinkhorn_epsilon",
           "need sinkhorn_epsilon > 0 and sinkhorn_iters >= 1")
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
    _check(a.blur_mode != "authors" or list(a.blur_p) == list(RELEASED_BLUR_P), "augment.blur_p",
           f"augment.blur_mode=authors reproduces the released code's blur, which it applies to its own list "
           f"augment.blur_p={list(RELEASED_BLUR_P)} (effective per global view: 0.0, 0.9; locals: 0.0); got "
           f"augment.blur_p={list(a.blur_p)}. Set your own probabilities with augment.blur_mode=nominal")
    _check(a.blur_kernel_size == 0 or (a.blur_kernel_size >= 3 and a.blur_kernel_size % 2 == 1),
           "augment.blur_kernel_size", f"must be 0 (from sigma) or an odd size >= 3, got {a.blur_kernel_size}")
    _check(0.0 < a.solarize_threshold <= 1.0, "augment.solarize_threshold", "must be in (0, 1]")
    _check(o.optimizer in ("sgd", "adamw"), "optim.optimizer", f"must be sgd or adamw, got {o.optimizer!r}")
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(not isinstance(t.num_workers, list) or len(t.num_workers) == 2, "train.num_workers",
           f"must be N or [min, max], got {t.num_workers}")
    _check(1 <= t.min_workers <= t.max_workers, "train.num_workers",
           f"must be >= 1 (and min <= max), got {t.num_workers}")
    _check(t.batch_size >= 2 and t.batch_size % t.max_workers == 0, "train.batch_size",
           f"must be >= 2 and divisible by the (maximum) number of workers ({t.max_workers}), got {t.batch_size}")
    _check(t.elastic_resize_interval_s >= 0, "train.elastic_resize_interval_s", "must be >= 0")
    _check(all(v >= 0 for v in t.worker_resources.values()), "train.worker_resources", "amounts must be >= 0")
    _check(not (t.elastic and t.max_failures == 0), "train.max_failures",
           "elastic training needs max_failures != 0 (a lost worker is a failure the run must survive)")
    st = cfg.storage
    _check(st.connect_timeout_s > 0 and st.request_timeout_s > 0, "storage.connect_timeout_s", "timeouts must be > 0")
    _check(st.read_retries >= 1, "storage.read_retries", "must be >= 1")
    _check(bool(st.access_key_id) == bool(st.secret_access_key), "storage.access_key_id",
           "give both access_key_id and secret_access_key, or neither (then the environment is used)")
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
    _check(t.precision in ("fp32", "bf16", "auto"), "train.precision",
           f"must be fp32, bf16 or auto, got {t.precision!r}")
    _check(t.torch_threads >= 0, "train.torch_threads", "must be >= 0")
    _check(t.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 = retry forever)")
    _check(t.checkpoints_to_keep >= 1, "train.checkpoints_to_keep", "must be >= 1")
    _check(t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0 (0 = a full pass)")
    _check(e.knn_k >= 1 and e.knn_temperature > 0, "eval.knn_k", "knn_k must be >= 1 and knn_temperature > 0")
    _check(e.linear_weight_decay >= 0, "eval.linear_weight_decay", "must be >= 0")
    _check(e.linear_max_iter >= 1, "eval.linear_max_iter", "must be >= 1")


def redacted_dict(cfg: ExcbConfig) -> dict[str, Any]:
    """The config as a dict with storage credentials replaced by ``***`` (safe to save or print)."""
    d = cfg.to_dict()
    for key in SECRET_KEYS:
        if d["storage"].get(key):
            d["storage"][key] = "***"
    return d


def dump_yaml(cfg: ExcbConfig) -> str:
    """YAML of the config, credentials redacted."""
    return yaml.safe_dump(redacted_dict(cfg), sort_keys=False)
