"""The driver's start-up, shared by ``excb pretrain``, ``excb bench`` and ``excb sweep``: storage options, the
dataset (checked, or prepared on first use for Fashion-MNIST) with its path resolved, and Ray."""

from __future__ import annotations

import dataclasses
import logging
import os

import ray

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


def init_ray(num_cpus: int | None = None) -> None:
    """Start (or join, when RAY_ADDRESS is set) a Ray instance, quietly."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-10 s progress dumps drown the epoch lines
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, logging_level=logging.WARNING)


def start_driver(cfg: ExcbConfig, *, storage_path: str | None = None, num_cpus: int | None = None,
                 start_ray: bool = True) -> ExcbConfig:
    """In this order: the requested experiment trackers installed; storage options from ``cfg.storage``;
    ``storage_path`` (where runs are written, if given) reachable; the dataset checked (or prepared); Ray started
    (``start_ray``). Returns the config with the resolved data path, the one every later step uses."""
    check_trackers(cfg)  # a requested tracker library that is not installed fails here, before Ray starts
    configure_storage(cfg.storage)
    if storage_path is not None:
        check_reachable(storage_path, "storage path")
    cfg = with_data_path(cfg, ensure_dataset(cfg))
    if start_ray:
        init_ray(num_cpus)
    return cfg
