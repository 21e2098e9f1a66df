"""The driver of a pretraining run: data through Ray Data, a ``TorchTrainer`` running :func:`train_worker`,
then the full evaluation and ``summary.json``.

The run's identity is ``storage_path/name``: relaunching the same pair resumes from its newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from excb.checkpoint import list_checkpoints
from excb.config import ExcbConfig, dump_yaml
from excb.data.errors import DatasetNotFoundError
from excb.data.pipeline import decoded_split
from excb.data.shards import prepare_fashion_mnist, shards_exist
from excb.engine import NonFiniteLossError
from excb.evaluate import evaluate_run
from excb.runfiles import CONFIG_FILE, read_metrics, write_summary
from excb.schedules import steps_per_epoch
from excb.storage import absolute, join, write_text
from excb.train import train_worker

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped; the message says why and which checkpoint is the last good one."""


def ensure_dataset(cfg: ExcbConfig) -> None:
    """Fashion-MNIST shards are prepared on first use; any other dataset must already be prepared."""
    if shards_exist(cfg.data.path):
        return
    if cfg.data.dataset == "fashion_mnist":
        print(f"[excb] preparing Fashion-MNIST shards at {cfg.data.path} (first use)", flush=True)
        prepare_fashion_mnist(cfg.data.path)
        return
    raise DatasetNotFoundError(
        f"no prepared shards at {cfg.data.path}: run `excb prepare folder SRC {cfg.data.path}` "
        f"(or `excb prepare fashion-mnist {cfg.data.path}`) first")


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


def _find_nonfinite(err: BaseException) -> str | None:
    """The NonFiniteLossError message inside Ray's wrapped worker error (Ray keeps only its text), if any."""
    text = f"{err!r} {err}"
    cur: BaseException | None = err
    while cur is not None:
        text += f" {cur!r}"
        cur = cur.__cause__ or cur.__context__
    marker = NonFiniteLossError.__name__
    if marker in text:
        tail = text.split(marker, 1)[1].lstrip(": ('\"")
        return tail.split("\n")[0].rstrip("')\"")
    return None


def build_trainer(cfg: ExcbConfig, storage_path: str, name: str) -> tuple[TorchTrainer, dict[str, Any]]:
    """Data (decoded once, materialised in the object store, block order shuffled per epoch) and the trainer."""
    t = cfg.train
    decoded = decoded_split(cfg.data.path, "train", image_size=cfg.data.image_size, channels=cfg.data.channels,
                            strict=cfg.data.strict_decode, limit=cfg.data.limit or None)
    if decoded.corrupt:
        print(f"[excb] skipped {decoded.corrupt} corrupt images (first ids: {decoded.corrupt_ids})", flush=True)
    spe = steps_per_epoch(decoded.rows, t.batch_size)
    run_dir = join(storage_path, name)
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "steps_per_epoch": spe, "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
        datasets={"train": decoded.dataset.randomize_block_order()},
    )
    info = {"train_rows": decoded.rows, "corrupt_images": decoded.corrupt, "steps_per_epoch": spe,
            "run_dir": run_dir}
    return trainer, info


def run_pretraining(cfg: ExcbConfig, storage_path: str = "runs", name: str = "fashion_mnist",
                    num_cpus: int | None = None) -> dict[str, Any]:
    """Prepare data if needed, train (or resume) through Ray Train, evaluate, write summary.json."""
    t0 = time.time()
    storage_path = absolute(storage_path)
    cfg.data.path = absolute(cfg.data.path)  # workers run in their own directories
    ensure_dataset(cfg)
    init_ray(num_cpus)
    trainer, info = build_trainer(cfg, storage_path, name)
    run_dir = info["run_dir"]
    write_text(join(run_dir, CONFIG_FILE), dump_yaml(cfg))
    print(f"[excb] run {run_dir}: {info['train_rows']} images, {info['steps_per_epoch']} steps/epoch, "
          f"{cfg.train.epochs} epochs, {cfg.train.num_workers} worker(s)", flush=True)
    t_fit = time.time()
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors; turn a NaN loss into a clear message
        good = list_checkpoints(run_dir)
        last = good[-1] if good else "none (no epoch finished)"
        reason = _find_nonfinite(e)
        if reason is not None:
            raise TrainingError(f"training stopped: non-finite loss ({reason}); "
                                f"last good checkpoint: {last}") from e
        raise TrainingError(f"training failed: {e}; last good checkpoint: {last}") from e
    fit_seconds = time.time() - t_fit
    summary: dict[str, Any] = {}
    if cfg.eval.final_eval:
        print("[excb] final evaluation (kNN on all train → test images) ...", flush=True)
        summary.update(evaluate_run(run_dir))
    history = read_metrics(run_dir)
    train_seconds = sum(r.get("epoch_seconds", 0.0) for r in history)
    images = len(history) * info["steps_per_epoch"] * cfg.train.batch_size
    summary.update(
        run_dir=run_dir, wall_seconds=time.time() - t0, fit_seconds=fit_seconds,
        train_seconds=train_seconds, images_per_second=images / train_seconds if train_seconds else 0.0,
        epochs=len(history), train_rows=info["train_rows"], corrupt_images=info["corrupt_images"],
        num_workers=cfg.train.num_workers, batch_size=cfg.train.batch_size,
        num_prototypes=cfg.model.num_prototypes, backbone=cfg.model.backbone)
    write_summary(run_dir, summary)
    return summary
