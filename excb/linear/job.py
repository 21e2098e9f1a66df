"""``excb linear RUN_DIR``: the paper's linear evaluation of a pretraining run, as a Ray Train job.

The driver picks the run's newest pretraining checkpoint that verifies, builds the training split as pretraining
does (decoded whole with ``train_decode=fit``; materialised when it fits the object store, streamed otherwise) and
the validation split (decoded at ``data.image_size``, centre square), and trains :mod:`excb.linear.worker` on
``num_workers`` workers. Everything goes to ``RUN_DIR/<name>/``: ``checkpoint_epochNNNN`` (at most
``checkpoints_to_keep``), ``metrics.jsonl``, ``config.yaml`` and ``summary.json``. Running the same command
again resumes from the newest checkpoint; a finished evaluation only reports again, reading no image and starting no
worker group. An evaluation folder belongs to one pretraining checkpoint: once the run has a newer one, evaluating it
needs another ``name``.
"""

from __future__ import annotations

import dataclasses
import posixpath
import time
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from excb import console
from excb.config import ExcbConfig
from excb.evaluation.features import load_teacher
from excb.linear.config import LinearConfig
from excb.linear.worker import linear_worker
from excb.method.schedules import steps_per_epoch
from excb.rundir.checkpoint import CheckpointError, list_checkpoints, load_latest
from excb.rundir.runfiles import read_metrics, summary_counts, write_summary
from excb.storage import absolute, join, ray_filesystem, resolve_fs, write_text

__all__ = ["count_classes", "previous_evaluation", "run_linear"]


def count_classes(cfg: ExcbConfig, path: str) -> int:
    """Classes of the train split: max label + 1 from the shards' label column, or the class folders of an image
    folder. WebDataset tars would need a pass over the data: set ``num_classes`` instead."""
    fmt = cfg.data.format
    if fmt == "image_folder":
        from excb.data.image_folder import train_classes

        return len(train_classes(path))
    if fmt == "shards":
        from excb.data.shards import list_shards
        from excb.storage import data_filesystem

        top = -1
        fs = data_filesystem(path) or resolve_fs(path)[0]
        for shard in list_shards(path, "train"):
            labels = pq.read_table(shard, columns=["label"], filesystem=fs)["label"]
            top = max(top, int(pc.max(labels).as_py() if len(labels) else -1))
        return top + 1
    raise ValueError(f"the number of classes of a {fmt} data set is not counted; set num_classes")


def _val_dataset(cfg: ExcbConfig, lc: LinearConfig) -> Any:
    from excb.data.pipeline import count_split_rows, decoded_split
    from excb.run.pretrain import should_materialize

    d = cfg.data
    limit = lc.val_limit or None
    rows = count_split_rows(d.path, "test", d.format, retries=cfg.storage.read_retries) if d.format != "webdataset" \
        else 0
    rows = min(rows, limit) if limit and rows else rows
    materialize = bool(rows) and should_materialize(cfg, rows)
    return decoded_split(d.path, "test", image_size=d.image_size, channels=d.channels, limit=limit, fmt=d.format,
                         materialize=materialize, rows=rows or None).dataset


def previous_evaluation(out_dir: str, epochs: int, checkpoint: str) -> dict[str, int] | None:
    """The data counts (``train_rows``, ``num_classes``) in the ``summary.json`` of the evaluation in ``out_dir``
    when it is finished — its newest checkpoint that loads ends epoch ``epochs`` or a later one: a relaunch then
    reports it again without reading an image. ``None`` when there is more to train, no checkpoint yet, or no
    summary with both counts (the job runs; its workers resume from the newest checkpoint).

    Raises:
        ValueError: the evaluation in ``out_dir`` is of another pretraining checkpoint than ``checkpoint`` (compared
            by folder name, so a moved run still matches): resuming or re-reporting it would label heads trained
            on other features with ``checkpoint``.
    """
    try:
        state, newest = load_latest(list_checkpoints(out_dir))
    except CheckpointError:
        return None
    evaluated = str(state.get("pretraining_checkpoint", ""))
    if posixpath.basename(evaluated.rstrip("/")) != posixpath.basename(checkpoint.rstrip("/")):
        raise ValueError(f"{out_dir} holds the linear evaluation of {evaluated} ({newest}), but the run's newest "
                         f"checkpoint is {checkpoint}: evaluate it under another name (name=...)")
    if int(state.get("epoch", 0)) < epochs:
        return None
    return summary_counts(out_dir, ["train_rows", "num_classes"])


def run_linear(run_dir: str, lc: LinearConfig, *, num_cpus: int | None = None) -> dict[str, Any]:
    """Train (or resume) the linear evaluation of the run at ``run_dir``; returns (and writes) its summary:
    the final top-1/top-5 of the head at ``lr`` and of the best head, its lr, and the per-epoch history."""
    from excb.run.pretrain import training_dataset
    from excb.run.startup import init_ray, train_logging_config

    t0 = time.time()
    run_dir = absolute(run_dir)
    state, checkpoint = load_latest(list_checkpoints(run_dir))
    _, cfg = load_teacher(state, checkpoint)  # refuses a checkpoint whose weights are not its backbone's
    pretrain_epoch = int(state["epoch"])
    del state
    out_dir = join(run_dir, lc.name)
    previous = previous_evaluation(out_dir, lc.epochs, checkpoint)
    if previous is not None:
        console.info(f"nothing to train: the linear evaluation in {out_dir} of {checkpoint} ends epoch {lc.epochs}")
        return _summarise(out_dir, run_dir, checkpoint, pretrain_epoch, lc, previous["num_classes"],
                          previous["train_rows"], t0)
    path = absolute(lc.data_path or cfg.data.path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path, limit=lc.train_limit),
                              train=dataclasses.replace(cfg.train, seed=lc.seed))
    num_classes = lc.num_classes or count_classes(cfg, path)
    if num_classes < 2:
        raise ValueError(f"the linear evaluation needs labels of at least 2 classes; found {num_classes} in {path}")
    init_ray(num_cpus)
    train = training_dataset(cfg)
    spe = steps_per_epoch(train.rows, lc.batch_size)
    if lc.max_steps_per_epoch:
        spe = min(spe, lc.max_steps_per_epoch)
    write_text(join(out_dir, "config.yaml"), yaml.safe_dump(lc.to_dict(), sort_keys=False))
    console.info(f"linear evaluation of {checkpoint} (epoch {pretrain_epoch}): {train.rows} train images, "
                 f"{num_classes} classes, {len(lc.head_lrs())} head(s), {lc.epochs} epochs of {spe} steps, "
                 f"{lc.num_workers} worker(s) -> {out_dir}")
    resources: dict[str, float] = {"CPU": lc.cpus_per_worker}
    if lc.use_gpu:
        resources["GPU"] = 1
    fs = ray_filesystem(run_dir)
    trainer = TorchTrainer(
        linear_worker,
        train_loop_config={"linear": lc.to_dict(), "cfg": cfg.to_dict(), "checkpoint": checkpoint,
                           "out_dir": out_dir, "num_classes": num_classes, "steps_per_epoch": spe},
        scaling_config=ray.train.ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=lc.name, storage_path=resolve_fs(run_dir)[1] if fs is not None else run_dir,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=lc.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=lc.max_failures),
            logging_config=train_logging_config()),
        datasets={"train": train.dataset, "val": _val_dataset(cfg, lc)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    trainer.fit()
    return _summarise(out_dir, run_dir, checkpoint, pretrain_epoch, lc, num_classes, train.rows, t0)


def _summarise(out_dir: str, run_dir: str, checkpoint: str, pretrain_epoch: int, lc: LinearConfig,
               num_classes: int, train_rows: int, t0: float) -> dict[str, Any]:
    """Write and return ``summary.json``: the last epoch's top-1/top-5 (head at ``lr`` and best head), the
    evaluation's shape and its times, from ``metrics.jsonl``."""
    history = read_metrics(out_dir)
    final = history[-1] if history else {}
    summary = {key: final.get(key) for key in ("top1", "top5", "best_top1", "best_top5", "best_lr", "val_rows")}
    summary.update(run_dir=run_dir, pretraining_checkpoint=checkpoint, pretraining_epoch=pretrain_epoch,
                   epochs=len(history), num_classes=num_classes, train_rows=train_rows, heads=len(lc.head_lrs()),
                   lr=lc.lr, wall_seconds=time.time() - t0,
                   train_seconds=sum(r.get("epoch_seconds", 0.0) for r in history))
    write_summary(out_dir, summary)
    return summary
