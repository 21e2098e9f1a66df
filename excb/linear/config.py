"""The linear-evaluation config: one flat YAML mapping plus ``key=value`` overrides.

Defaults are the released linear evaluation for ResNets (``engine/linear_eval/`` of ``ManiadisG/ExCB``): 100
epochs, 224-px RandomResizedCrop (scale 0.08-1) + horizontal flip for training, resize 256 + centre crop 224 for
evaluation, SGD with momentum 0.9, global batch 256, lr 0.3 on a cosine schedule to 0, weight decay 1e-6, the
frozen backbone run under mixed precision. ViTs use batch 1024, lr 0.004, no weight decay and ``lr_heads`` heads
at lrs ``lr + (i - (lr_heads - 1) / 2) · lr_interval`` (non-positive ones dropped), all trained in the same pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from excb.config.loading import _section_update
from excb.config.sections import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class LinearConfig:
    epochs: int = 100
    batch_size: int = 256  # global, over all workers
    lr: float = 0.3
    lr_heads: int = 1  # heads trained side by side at nearby learning rates (the best one is reported)
    lr_interval: float = 0.0  # spacing of their learning rates
    momentum: float = 0.9
    weight_decay: float = 1e-6
    crop_size: int = 224  # training: RandomResizedCrop to this size ...
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # ... with this area range
    flip_p: float = 0.5
    eval_resize: int = 256  # evaluation: the (square, centre-cropped) decoded image resized to this ...
    eval_crop: int = 224  # ... then centre-cropped to this
    precision: str = "auto"  # the frozen backbone's autocast: auto = bf16 where supported, else fp32
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # per worker; 0 = torch's default
    max_failures: int = 0  # worker-group restarts (each resumes from the newest checkpoint); -1 = forever
    checkpoints_to_keep: int = 2
    eval_every_epochs: int = 0  # also evaluate every N epochs (0: only after the last epoch)
    log_every_steps: int = 50
    max_steps_per_epoch: int = 0  # 0: a full pass (rows // batch_size steps)
    train_limit: int = 0  # first N images of each split only (0: all): quick runs and tests
    val_limit: int = 0
    data_path: str = ""  # default: the pretraining run's data.path
    num_classes: int = 0  # 0: from the data (shards: the label column; image folder: the class folders)
    name: str = "linear"  # RUN_DIR/<name>/ holds the checkpoints, metrics.jsonl and summary.json
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.num_workers

    def head_lrs(self) -> list[float]:
        """lr_i = lr + (i − (n − 1)/2) · lr_interval for i < n = ``lr_heads``, keeping the positive ones."""
        n = self.lr_heads
        lrs = [self.lr + (i - (n - 1) / 2) * self.lr_interval for i in range(n)]
        return [round(v, 12) for v in lrs if v > 0]


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate_linear(c: LinearConfig) -> LinearConfig:
    """Reject values that cannot work, naming the key; returns ``c``."""
    for key in ("epochs", "batch_size", "lr_heads", "crop_size", "eval_resize", "eval_crop", "num_workers",
                "checkpoints_to_keep", "log_every_steps"):
        _check(getattr(c, key) >= 1, key, f"must be >= 1, got {getattr(c, key)}")
    _check(c.lr > 0, "lr", f"must be > 0, got {c.lr}")
    _check(c.lr_interval >= 0, "lr_interval", "must be >= 0")
    _check(c.batch_size % c.num_workers == 0, "batch_size",
           f"{c.batch_size} does not split evenly over {c.num_workers} workers")
    _check(0 <= c.momentum < 1 and c.weight_decay >= 0, "momentum", "need 0 <= momentum < 1, weight_decay >= 0")
    _check(len(c.crop_scale) == 2 and 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1, "crop_scale",
           f"must be [lo, hi] with 0 < lo <= hi <= 1, got {c.crop_scale}")
    _check(c.eval_crop <= c.eval_resize, "eval_crop", "must be <= eval_resize")
    _check(0 <= c.flip_p <= 1, "flip_p", "must be a probability")
    _check(c.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {c.precision!r}")
    _check(c.max_failures >= -1, "max_failures", "must be >= -1 (-1 = retry forever)")
    for key in ("eval_every_epochs", "max_steps_per_epoch", "train_limit", "val_limit", "num_classes",
                "torch_threads"):
        _check(getattr(c, key) >= 0, key, "must be >= 0")
    _check(c.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
    _check(bool(c.name) and "/" not in c.name, "name", "must be a plain folder name")
    return c


def linear_from_dict(raw: dict[str, Any] | None) -> LinearConfig:
    """A validated config from a flat mapping (unknown keys raise ConfigError)."""
    c = LinearConfig()
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"a linear-evaluation config must be a mapping, got {raw!r}")
    _section_update(c, dict(raw or {}), "linear")
    return validate_linear(c)


def load_linear_config(path: str | Path | None, overrides: list[str] | None = None) -> LinearConfig:
    """The YAML file at ``path`` (None: the defaults) with ``key=value`` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"linear-evaluation config not found: {path}")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        raw[key.strip()] = yaml.safe_load(value)
    return linear_from_dict(raw)
