"""The driver's start-up, shared by ``excb pretrain``, ``excb bench`` and ``excb sweep``: storage options, the
dataset (checked, or prepared on first use for Fashion-MNIST) with its path resolved, and Ray."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import ray
import ray.train

from excb import console
from excb.config import ExcbConfig
from excb.data.errors import DatasetNotFoundError
from excb.data.prepare import prepare_fashion_mnist
from excb.data.registry import require_split
from excb.data.shards import shards_exist
from excb.run.tracking import check_available as check_trackers
from excb.storage import absolute, check_reachable
from excb.storage import configure as configure_storage


def ensure_dataset(cfg: ExcbConfig) -> str:
    """The dataset's path, made absolute when local (Ray workers and Tune trials run in other directories), once
    its data is there: Fashion-MNIST shards are prepared on first use; any other dataset must already exist
    (prepared shards, or an image folder / WebDataset tars for ``data.format`` image_folder / webdataset, checked
    with one listing). Object storage is checked first, so an unreachable endpoint or a missing bucket fails here,
    naming the URI. When the run evaluates with kNN (per epoch or at the end), the test split (``val/`` or
    ``test/``) must exist too. ``cfg`` is not changed."""
    path = absolute(cfg.data.path)
    check_reachable(path, "dataset")
    fmt = cfg.data.format
    if fmt != "shards":
        require_split(path, "train", fmt)
        if cfg.eval.epoch_knn_train > 0 or cfg.eval.final_eval:
            try:
                require_split(path, "test", fmt)
            except DatasetNotFoundError as e:
                raise DatasetNotFoundError(f"{e}; the kNN evaluation needs it (or set eval.epoch_knn_train=0 "
                                           "eval.final_eval=false)") from None
        return path
    if shards_exist(path):
        return path
    if cfg.data.dataset == "fashion_mnist":
        console.info(f"preparing Fashion-MNIST shards at {path} (first use)")
        prepare_fashion_mnist(path)
        return path
    raise DatasetNotFoundError(
        f"no prepared shards at {path}: run `excb prepare folder SRC {path}` "
        f"(or `excb prepare fashion-mnist {path}`) first")


def with_data_path(cfg: ExcbConfig, path: str) -> ExcbConfig:
    """A copy of ``cfg`` whose ``data.path`` is ``path``."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))


# What the job's Ray workers get when not verbose (each skipped where this process's environment sets it already,
# so a user's own setting, inherited by a local Ray's workers, stays in force):
QUIET_WORKER_ENV = {
    # Ray Data's INFO lines: "Starting execution of Dataset ...", "Execution plan ...", "... execution finished"
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # warnings raised before the setup hook runs (while the worker imports Ray and its dependencies)
    "PYTHONWARNINGS": ",".join(f"ignore::{c.__name__}" for c in console.HIDDEN_WARNINGS),
}
QUIET_WORKER_HOOK = "excb.console.quiet_ray_worker"


def _job_runtime_env() -> dict[str, Any]:
    """The runtime environment a submitted job (``ray job submit``) already has; {} for a plain driver."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


def ray_runtime_env(verbose: bool, job_env: dict[str, Any] | None = None,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job-level runtime environment :func:`init_ray` passes to ``ray.init``: ``EXCB_VERBOSE`` for every
    worker (a Tune trial reads it), and when not verbose :data:`QUIET_WORKER_ENV` and the
    ``worker_process_setup_hook`` :func:`excb.console.quiet_ray_worker`. Keys the submitted job's runtime
    environment (``job_env``) sets already are left out: Ray refuses to merge two values of one key."""
    environ = os.environ if environ is None else environ
    job_env = job_env or {}
    taken = set((job_env.get("env_vars") or {}))
    env_vars = {console.VERBOSE_ENV: "1" if verbose else "0"}
    if not verbose:
        env_vars.update({k: v for k, v in QUIET_WORKER_ENV.items() if k not in environ})
    runtime_env: dict[str, Any] = {"env_vars": {k: v for k, v in env_vars.items() if k not in taken}}
    if not verbose and "worker_process_setup_hook" not in job_env and not any(
            "WORKER_PROCESS_SETUP_HOOK" in k for k in taken):
        runtime_env["worker_process_setup_hook"] = QUIET_WORKER_HOOK
    return runtime_env


def train_logging_config() -> ray.train.LoggingConfig:
    """Ray Train's console level for its controller and workers: INFO when verbose (Ray's default: worker group
    starts, "Checkpoint successfully created", "Reporting training result N: TrainingReport(...)" with the whole
    metrics dict per report), else WARNING (its warnings and errors only; Ray Train's log files under the
    session's ``logs/train`` keep every level either way)."""
    return ray.train.LoggingConfig(log_level="INFO" if console.is_verbose() else "WARNING")


# Ray's own notices on the driver that say nothing about this run (its warnings stay: "Token authentication is
# disabled ..." included). Dropped by message, on the logger that emits each, when not verbose.
QUIET_DRIVER_NOTICES = {
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
}


class _DropNotices(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def configure_console() -> None:
    """This process's share of the console settings (the driver, or a Tune trial building its own trainer):
    when not verbose, library deprecation/future warnings ignored, Ray Data's progress bars off (they would come
    through as progress lines or ``tqdm`` output) and its driver-side logging at WARNING (no per-10 s progress
    dumps), Ray's :data:`QUIET_DRIVER_NOTICES` dropped. Verbose leaves Ray's defaults."""
    if console.is_verbose():
        return
    console.hide_library_warnings()  # again after `import ray`, whose own filter went in front of ours
    for name, prefixes in QUIET_DRIVER_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(prefixes))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger(console.RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # datasets built from here on carry it to their actors


def init_ray(num_cpus: int | None = None) -> None:
    """Start (or join, when RAY_ADDRESS is set) a Ray instance. Not verbose: the driver's ``ray`` logger at
    WARNING (no "Started a local Ray instance" notice) and the workers set up by :func:`ray_runtime_env`;
    verbose: Ray's INFO and Ray's defaults in the workers. Worker output reaches this console either way
    (``log_to_driver``): ``[excb]`` lines, warnings, and errors with their tracebacks."""
    configure_console()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    verbose = console.is_verbose()
    kwargs: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.WARNING,
                              "runtime_env": ray_runtime_env(verbose, _job_runtime_env())}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def start_driver(cfg: ExcbConfig, *, storage_path: str | None = None, num_cpus: int | None = None,
                 start_ray: bool = True) -> ExcbConfig:
    """In this order: the console settings (:func:`configure_console`); the requested experiment trackers
    installed; storage options from ``cfg.storage``; ``storage_path`` (where runs are written, if given)
    reachable; the dataset checked (or prepared); Ray started (``start_ray``). Returns the config with the
    resolved data path, the one every later step uses."""
    configure_console()
    check_trackers(cfg)  # a requested tracker library that is not installed fails here, before Ray starts
    configure_storage(cfg.storage)
    if storage_path is not None:
        check_reachable(storage_path, "storage path")
    cfg = with_data_path(cfg, ensure_dataset(cfg))
    if start_ray:
        init_ray(num_cpus)
    return cfg
