"""The config's sections as typed dataclasses, every key with its default and a comment on its meaning, and the
names the config accepts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
    #   (bf16 on GPUs that support it and on CPUs with AMX-BF16, fp32 elsewhere)
    seed: int = 0
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    checkpoint_every_steps: int | None = None  # also checkpoint every N steps inside an epoch (null = at epoch
    #   ends only); a resume continues the epoch at the next step without reusing its consumed samples
    checkpoint_every_minutes: float | None = None  # also checkpoint inside an epoch when this much time has passed
    #   since the last checkpoint (checked at each log step); either or both; null = off
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
    # How the final evaluation / `excb evaluate` gets its features: "memory" decodes both splits into this process
    # (small data sets), "ray" extracts them with Ray Data actors into RUN/features/ (Parquet, reused) and runs a
    # block-wise kNN over Ray tasks (any size), "auto" = memory for prepared shards whose decoded train split takes
    # at most in_memory_max_mb, ray otherwise.
    engine: str = "auto"
    in_memory_max_mb: int = 2048
    feature_workers: int = 0  # Ray Data actors extracting features (0: train.max_workers); one GPU each with use_gpu
    feature_batch_size: int = 256
    knn_block_rows: int = 8192  # train feature rows per similarity block (memory per task ~ rows x D x 4 bytes)
    knn_max_chunk_rows: int = 50000  # test rows per kNN task at most
    linear_in_memory_mb: float = 4096.0  # train features up to this: full-batch L-BFGS; larger (or 0): streaming SGD
    linear_stream_epochs: int = 10  # the streaming probe: passes, lr (cosine to 0, momentum 0.9), batch
    linear_stream_lr: float = 0.1
    linear_stream_batch_size: int = 1024
    # The same kNN and linear probe on raw pixels and on the untrained network, next to the model's scores (in-memory
    # engine only; cached per dataset under $EXCB_CACHE_DIR or ~/.cache/excb): what the model's numbers mean.
    reference_scores: bool = True


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
    read_retries: int = 3  # tries per object-storage read (shard footers, training data; waits 1, 2, 4.. s) before
    #   the object is reported by name and the run stops


@dataclass
class TrackingConfig:
    """Experiment trackers: the rank-0 worker writes the run's scalars (per log interval and per epoch) to each one
    enabled. Credentials come only from the environment of the training workers (WANDB_API_KEY; MLFLOW_TRACKING_TOKEN
    or MLFLOW_TRACKING_USERNAME/PASSWORD); none is a config key, and none is written into the run directory."""

    tensorboard: bool = True  # TensorBoard event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`)
    upload_every_s: float = 60.0  # within an epoch, copy the event file into the run dir this often (it is
    #   always copied at each epoch end and when the run stops); the file is written in a local folder first
    wandb: bool = False  # Weights & Biases (pip install 'excb[wandb]'); online mode needs WANDB_API_KEY
    wandb_project: str = "excb"
    wandb_entity: str = ""  # "" = the default entity of the API key
    wandb_mode: str = "online"  # online | offline (run files in RUN/wandb/; upload later with `wandb sync`)
    mlflow: bool = False  # MLflow (pip install 'excb[mlflow]')
    mlflow_tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else a file store in RUN/mlruns (local run dirs)
    mlflow_experiment: str = "excb"
    run_name: str = ""  # the W&B / MLflow run's name; "" = the run directory's name


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


BACKBONES = ("convnet", "resnet18_small", "resnet50", "vit_s16")
DATA_FORMATS = ("shards", "image_folder", "webdataset")
BALANCERS = ("excb", "centering", "sinkhorn", "none")
TRAIN_DECODES = ("fit", "centre_crop")
RELEASED_BLUR_P = (1.0, 0.1)  # the released code's per-global-view blur list (configs/main_config.yaml: p_blur)
WANDB_MODES = ("online", "offline")
