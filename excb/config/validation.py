"""Checks of a whole config before anything starts: each bad value raises :class:`ConfigError` naming its key."""

from __future__ import annotations

import math
from urllib.parse import urlsplit

from excb.config.sections import (
    BACKBONES,
    BALANCERS,
    DATA_FORMATS,
    RELEASED_BLUR_P,
    TRAIN_DECODES,
    WANDB_MODES,
    ConfigError,
    ExcbConfig,
)


def _is_torchvision_classifier(name: str) -> bool:
    """``torchvision:<model>`` naming one of torchvision's classification models."""
    if not name.startswith("torchvision:"):
        return False
    import torchvision

    return name.split(":", 1)[1] in torchvision.models.list_models(module=torchvision.models)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: ExcbConfig) -> ExcbConfig:
    """Reject values that cannot work, naming the key (runs before Ray or any worker starts); returns ``cfg``."""
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
    _check(m.backbone in BACKBONES or _is_torchvision_classifier(m.backbone), "model.backbone",
           f"must be one of {BACKBONES} or torchvision:<classification model>, got {m.backbone!r}")
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
    _check(not me.kmeans_init or me.kmeans_samples >= m.num_prototypes, "method.kmeans_samples",
           f"k-means init needs at least model.num_prototypes={m.num_prototypes} samples, got "
           f"{me.kmeans_samples}")
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
    _check(e.engine in ("auto", "memory", "ray"), "eval.engine", f"must be auto, memory or ray, got {e.engine!r}")
    for key in ("in_memory_max_mb", "feature_batch_size", "knn_block_rows", "knn_max_chunk_rows",
                "linear_stream_epochs", "linear_stream_batch_size"):
        _check(getattr(e, key) >= 1, f"eval.{key}", f"must be >= 1, got {getattr(e, key)}")
    _check(e.feature_workers >= 0, "eval.feature_workers", "must be >= 0 (0: train.max_workers)")
    _check(e.linear_stream_lr > 0, "eval.linear_stream_lr", "must be > 0")
    _check(e.linear_in_memory_mb >= 0, "eval.linear_in_memory_mb", "must be >= 0 (0: always the streaming probe)")
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
    _check(t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1, "train.checkpoint_every_steps",
           f"must be >= 1 (or null: at epoch ends only), got {t.checkpoint_every_steps}")
    _check(t.checkpoint_every_minutes is None or t.checkpoint_every_minutes > 0, "train.checkpoint_every_minutes",
           f"must be > 0 (or null: off), got {t.checkpoint_every_minutes}")
    _check(t.checkpoint_every_minutes is None or t.log_every_steps >= 1, "train.checkpoint_every_minutes",
           "is checked at each log step: needs train.log_every_steps >= 1")
    _check(t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0 (0 = a full pass)")
    _check(e.knn_k >= 1 and e.knn_temperature > 0, "eval.knn_k", "knn_k must be >= 1 and knn_temperature > 0")
    _check(e.linear_weight_decay >= 0, "eval.linear_weight_decay", "must be >= 0")
    _check(e.linear_max_iter >= 1, "eval.linear_max_iter", "must be >= 1")
    _validate_tracking(cfg)
    return cfg


_WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in project names


def _validate_tracking(cfg: ExcbConfig) -> None:
    """The ``tracking`` section; a tracker URI holding credentials is refused (the config is saved with the run)."""
    tr = cfg.tracking
    _check(tr.upload_every_s > 0 and math.isfinite(tr.upload_every_s), "tracking.upload_every_s",
           f"must be a positive number of seconds, got {tr.upload_every_s}")
    _check(tr.wandb_mode in WANDB_MODES, "tracking.wandb_mode", f"must be one of {WANDB_MODES}, got {tr.wandb_mode!r}")
    _check(bool(tr.wandb_project.strip()) and not any(c in tr.wandb_project for c in _WANDB_PROJECT_FORBIDDEN),
           "tracking.wandb_project", f"must be a non-empty name without any of {_WANDB_PROJECT_FORBIDDEN!r}, "
           f"got {tr.wandb_project!r}")
    _check(bool(tr.mlflow_experiment.strip()), "tracking.mlflow_experiment", "must be a non-empty name")
    uri = tr.mlflow_tracking_uri
    try:
        parts = urlsplit(uri)
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError:
        parts, has_credentials = None, False
    _check(parts is not None, "tracking.mlflow_tracking_uri", "is not a valid URI")
    _check(not has_credentials, "tracking.mlflow_tracking_uri",
           "must not hold credentials (the config is saved with the run): put them in the environment as "
           "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
