"""The driver of a pretraining run: data through Ray Data, a ``TorchTrainer`` running :func:`train_worker`,
then the full evaluation and ``summary.json``.

The run's identity is ``storage_path/name``: relaunching the same pair resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from excb import console
from excb.config import ExcbConfig, dump_yaml
from excb.data.pipeline import DecodedSplit, count_split_rows, decoded_split
from excb.data.skip_list import drop_listed
from excb.evaluation.evaluate import evaluate_run
from excb.method.step import NonFiniteLossError
from excb.run.scaling import check_kmeans_init_feasible, plan_for
from excb.run.startup import start_driver, train_logging_config
from excb.run.worker import train_worker
from excb.rundir.checkpoint import finished_checkpoint, list_checkpoints
from excb.rundir.runfiles import CONFIG_FILE, read_metrics, summary_counts, write_summary
from excb.storage import (
    absolute,
    join,
    ray_filesystem,
    resolve_fs,
    write_text,
)


class TrainingError(RuntimeError):
    """Training stopped; the message says why and which checkpoint is the last good one."""


def _error_text(err: BaseException) -> str:
    """Every message inside Ray's wrapped worker error (Ray keeps only the text of the worker's exception): the
    chain, Ray Train's per-rank failures and their task errors' causes."""
    texts: list[str] = []
    todo: list[BaseException] = [err]
    while todo and len(texts) < 50:
        cur = todo.pop()
        texts += [str(cur), repr(cur)]
        todo.extend(e for e in (cur.__cause__, cur.__context__, getattr(cur, "cause", None)) if e is not None)
        todo.extend(v for v in (getattr(cur, "worker_failures", None) or {}).values() if isinstance(v, BaseException))
    return "\n".join(texts)


def _find_nonfinite(err: BaseException) -> str | None:
    """The NonFiniteLossError message (``loss is nan at epoch E, step S``), if the error holds one: the
    exception's own line (``NonFiniteLossError: ...`` or its repr), not the traceback's ``raise`` line."""
    m = re.search(rf"{NonFiniteLossError.__name__}(?:: |\(['\"])([^\n'\"]+)", _error_text(err))
    return m.group(1).strip() if m else None


_UNREACHABLE = "object storage unreachable: "


def _find_unreachable(err: BaseException) -> str | None:
    """The :class:`excb.retrying_fs.StorageUnreachableError` message inside Ray's wrapped worker error, if any."""
    text = _error_text(err)
    if _UNREACHABLE not in text:
        return None
    return _UNREACHABLE + text.split(_UNREACHABLE, 1)[1].split("\n")[0].rstrip("')\"")


def _scaling_config(cfg: ExcbConfig) -> ray.train.ScalingConfig:
    """Fixed ``N`` workers, or ``(min, max)`` for Ray Train's elastic scaling; resources per worker."""
    t = cfg.train
    resources: dict[str, float] = {"CPU": t.cpus_per_worker, **t.worker_resources}
    if t.use_gpu:
        resources["GPU"] = 1
    if not t.elastic:
        return ray.train.ScalingConfig(num_workers=t.max_workers, use_gpu=t.use_gpu, resources_per_worker=resources)
    return ray.train.ScalingConfig(num_workers=(t.min_workers, t.max_workers), use_gpu=t.use_gpu,
                                   resources_per_worker=resources,
                                   elastic_resize_monitor_interval_s=t.elastic_resize_interval_s)


def should_materialize(cfg: ExcbConfig, rows: int) -> bool:
    """``data.materialize``; ``auto``: keep the decoded train split in the object store when it takes at most a
    quarter of it (Fashion-MNIST: 47 MB), stream it otherwise (ImageNet at 256 px: ~250 GB)."""
    d = cfg.data
    if d.materialize != "auto":
        return bool(d.materialize)
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    return rows * d.channels * d.image_size ** 2 <= store / 4


def training_dataset(cfg: ExcbConfig) -> DecodedSplit:
    """The train split exactly as the trainer gets it (``dataset``), with its row and corrupt-image counts.
    ``excb bench`` times it alone.

    Materialised: decoded once into the object store, block order shuffled per pass. Streamed (big data, see
    :func:`should_materialize`): read and decoded in Ray Data's CPU tasks on every pass, file order shuffled per
    pass; the row count comes before decoding (:func:`excb.data.pipeline.count_split_rows`, or
    ``data.train_rows``), and corrupt images are dropped on the fly: up to ``rows mod global batch`` of them fit
    in an epoch's slack, more stop the epoch with "data shard ran out" (use ``data.strict_decode`` to find them)."""
    d = cfg.data
    limit = d.limit or None
    fit = d.train_decode == "fit"
    rows = count_split_rows(d.path, "train", d.format, known=d.train_rows, retries=cfg.storage.read_retries)
    rows = min(rows, limit) if limit else rows
    if not should_materialize(cfg, rows):
        console.info(f"streaming the train split ({rows} images, data.format={d.format}): read and decoded "
              "every epoch")
        return decoded_split(d.path, "train", image_size=d.image_size, channels=d.channels, strict=d.strict_decode,
                             limit=limit, fmt=d.format, materialize=False, rows=rows, shuffle_seed=cfg.train.seed,
                             fit=fit)
    decoded = decoded_split(d.path, "train", image_size=d.image_size, channels=d.channels,
                            strict=d.strict_decode, limit=limit, fmt=d.format, fit=fit, rows=rows)
    if decoded.corrupt:
        console.info(f"skipped {decoded.corrupt} corrupt images (first ids: {decoded.corrupt_ids})")
    return dataclasses.replace(decoded, dataset=decoded.dataset.randomize_block_order())


def _run_info(cfg: ExcbConfig, run_dir: str, rows: int, corrupt: int) -> dict[str, Any]:
    """What the driver reports of a run's data: its train rows, corrupt images skipped, steps per epoch (the
    :func:`~excb.run.scaling.plan_for` of ``rows`` at ``train.max_workers``, which raises when the data is smaller
    than one batch) and the run directory."""
    plan = plan_for(cfg, cfg.train.max_workers, rows)
    return {"train_rows": rows, "corrupt_images": corrupt, "steps_per_epoch": plan.steps_per_epoch, "run_dir": run_dir}


def build_trainer(cfg: ExcbConfig, storage_path: str, name: str, callbacks: list[Any] | None = None,
                  data: DecodedSplit | None = None) -> tuple[TorchTrainer, dict[str, Any]]:
    """The trainer over :func:`training_dataset` (or ``data``, already built from the same config).

    ``storage_path`` may be local or an s3:// / gs:// URI; Ray Train persists checkpoints there through the
    same pyarrow filesystem the rest of the run uses.
    """
    t = cfg.train
    decoded = data if data is not None else training_dataset(cfg)
    run_dir = join(storage_path, name)
    info = _run_info(cfg, run_dir, decoded.rows, decoded.corrupt)  # raises early when the data is under one batch
    check_kmeans_init_feasible(cfg, decoded.rows)  # a worker raising it would be restarted forever
    fs = ray_filesystem(storage_path)
    ray_storage_path = resolve_fs(storage_path)[1] if fs is not None else storage_path
    run_fs, run_path = resolve_fs(run_dir)
    # A run resumed inside an epoch leaves out what that epoch already consumed (excb.data.skip_list). Streamed,
    # the step fuses into the decode tasks (same resources); materialized, it is a cheap filter of its own that
    # must not wait for a whole CPU (in a sweep, the trials' workers hold them: the pass would never start).
    dataset = decoded.dataset.map_batches(drop_listed, fn_kwargs={"fs": run_fs, "run_path": run_path},
                                          batch_format="numpy", batch_size=None,
                                          **({} if decoded.streamed else {"num_cpus": 0.1}))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "train_rows": decoded.rows, "run_dir": run_dir},
        scaling_config=_scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name, storage_path=ray_storage_path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks, logging_config=train_logging_config()),
        datasets={"train": dataset},
    )
    return trainer, info


def _data_info_of_finished_run(cfg: ExcbConfig, run_dir: str) -> dict[str, Any] | None:
    """:func:`_run_info` of a finished run from the counts in its previous ``summary.json``, so that relaunching it
    reads and decodes no images. ``None`` when there is no readable summary with ``train_rows``: the caller builds
    the dataset as for a new run."""
    counts = summary_counts(run_dir, ["train_rows"], ["corrupt_images"])
    if counts is None:
        return None
    return _run_info(cfg, run_dir, counts["train_rows"], counts["corrupt_images"])


def run_pretraining(cfg: ExcbConfig, storage_path: str = "runs", name: str = "fashion_mnist",
                    num_cpus: int | None = None) -> dict[str, Any]:
    """Prepare data if needed, train (or resume) through Ray Train, evaluate, write summary.json. A run whose
    checkpoint already ends its last epoch (:func:`~excb.rundir.checkpoint.finished_checkpoint`) starts no worker
    group and, when its previous summary gives the data counts, reads no training images: it is evaluated and
    summarised again (``fit_seconds`` 0)."""
    t0 = time.time()
    storage_path = absolute(storage_path)
    cfg = start_driver(cfg, storage_path=storage_path, num_cpus=num_cpus)
    run_dir = join(storage_path, name)
    finished = finished_checkpoint(run_dir, cfg.train.epochs)
    info = _data_info_of_finished_run(cfg, run_dir) if finished is not None else None
    trainer = None
    if info is None:
        trainer, info = build_trainer(cfg, storage_path, name)
    write_text(join(run_dir, CONFIG_FILE), dump_yaml(cfg))
    console.info(f"run {run_dir}: {info['train_rows']} images, {info['steps_per_epoch']} steps/epoch, "
          f"{cfg.train.epochs} epochs, {cfg.train.num_workers} worker(s)")
    if cfg.train.elastic:
        console.info(f"elastic: {cfg.train.min_workers}-{cfg.train.max_workers} workers, per-worker batch "
              f"{cfg.train.per_worker_batch}, lr scaled by workers/{cfg.train.max_workers}")
    t_fit = time.time()
    try:
        if finished is None:
            assert trainer is not None  # only a finished run takes its data counts from its summary
            trainer.fit()
        else:  # a relaunch of a finished run: no worker group to start for nothing
            console.info(f"nothing to train: {finished} ends epoch {cfg.train.epochs} or later")
    except Exception as e:  # Ray wraps worker errors; turn a NaN loss into a clear message
        good = list_checkpoints(run_dir)
        last = good[-1] if good else "none (no epoch finished)"
        reason = _find_nonfinite(e)
        if reason is not None:
            raise TrainingError(f"training stopped: non-finite loss ({reason}); "
                                f"last good checkpoint: {last}") from e
        unreachable = _find_unreachable(e)
        if unreachable is not None:
            raise TrainingError(f"training stopped: {unreachable}; last good checkpoint: {last} (run the same "
                                "command again to resume once the storage answers)") from e
        raise TrainingError(f"training failed: {e}; last good checkpoint: {last}") from e
    fit_seconds = time.time() - t_fit if finished is None else 0.0
    summary: dict[str, Any] = {}
    if cfg.eval.final_eval:
        console.info("final evaluation (kNN on all train → test images) ...")
        summary.update(evaluate_run(run_dir))
    history = read_metrics(run_dir)
    train_seconds = sum(r.get("epoch_seconds", 0.0) for r in history)
    images = sum(r.get("steps_per_epoch", info["steps_per_epoch"]) * r.get("global_batch", cfg.train.batch_size)
                 for r in history)
    summary.update(
        run_dir=run_dir, wall_seconds=time.time() - t0, fit_seconds=fit_seconds,
        train_seconds=train_seconds, images_per_second=images / train_seconds if train_seconds else 0.0,
        epochs=len(history), train_rows=info["train_rows"], corrupt_images=info["corrupt_images"],
        num_workers=cfg.train.num_workers, batch_size=cfg.train.batch_size,
        workers_per_epoch=[r.get("workers", cfg.train.max_workers) for r in history],
        optimizer_steps=history[-1]["step"] if history else 0,
        data_wait_fraction=(sum(r.get("data_wait_fraction", 0.0) * r.get("epoch_seconds", 0.0) for r in history)
                            / train_seconds if train_seconds else 0.0),
        num_prototypes=cfg.model.num_prototypes, backbone=cfg.model.backbone)
    write_summary(run_dir, summary)
    return summary
