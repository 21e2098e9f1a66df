"""The Ray Train worker loop: plain PyTorch plus ``get_dataset_shard``, ``report`` and checkpoints.

Every rank runs exactly the same number of steps per epoch. After each epoch rank 0 writes a checkpoint (model,
teacher, optimiser, balancer, step, epoch, metric history) and reports the epoch's metrics; relaunching the run
resumes from the newest checkpoint that verifies, so the final state has each epoch exactly once.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch

from excb import console
from excb.config import ExcbConfig, from_dict, redacted_dict
from excb.data.pipeline import load_split_arrays
from excb.distributed import all_reduce_mean
from excb.evaluation.evaluate import evaluate_teacher
from excb.evaluation.metrics import estimate_stats
from excb.method.learner import ExcbLearner
from excb.run.scaling import plan_for
from excb.rundir.checkpoint import (
    CheckpointError,
    checkpoint_dir_name,
    clear_staging,
    list_checkpoints,
    load_latest,
    new_local_state_dir,
)
from excb.rundir.runfiles import SAMPLE_IDS_DIR, write_metrics
from excb.storage import configure as configure_storage
from excb.storage import join, write_text


def set_torch_threads(cfg: ExcbConfig) -> int:
    """Intra-op threads of a training process: ``train.torch_threads``, or every core of the machine."""
    threads = cfg.train.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def training_state(learner: ExcbLearner, epoch: int, history: list[dict[str, Any]],
                   cfg: ExcbConfig) -> dict[str, Any]:
    """Everything a resume needs, as plain tensors, numbers and strings (loadable with weights_only=True): the
    learner's state (student, teacher, balancer, optimiser, next step), the epochs done, the metric history and
    the redacted config."""
    return {**learner.state_dict(), "epoch": epoch, "history": history, "config": redacted_dict(cfg)}


class EpochFeed:
    """Exactly ``steps`` batches ``(images uint8 [B, C, S, S], valid_hw int [B, 2] or None)`` from this worker's
    shard for one pass, timing the wait for data (``valid_hw``: each image's size in its canvas, see
    ``data.train_decode``; None when the dataset has no such column).

    The order is Ray Data's block order for this pass (randomised per pass) refined by a local shuffle buffer
    seeded with ``seed``; ``wait_seconds`` is the time spent waiting for the next batch (not hidden by prefetch),
    ``first_wait_seconds`` the part of it spent on the first batch (the pass's start-up), and ``ids`` (when
    recording) the sample ids consumed, in order.
    """

    def __init__(self, shard: Any, batch_size: int, steps: int, device: torch.device, seed: int,
                 record_ids: bool = False) -> None:
        self.shard, self.batch_size, self.steps, self.device, self.seed = shard, batch_size, steps, device, seed
        self.wait_seconds = self.first_wait_seconds = 0.0
        self.ids: list[str] | None = [] if record_ids else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        it = iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True,
                                          local_shuffle_buffer_size=4 * self.batch_size,
                                          local_shuffle_seed=self.seed))
        for n in range(self.steps):
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"data shard ran out after {n} of {self.steps} steps; every rank needs the "
                                   "same step count") from None
            images = torch.from_numpy(batch["image"])
            if self.device.type == "cuda":  # page-locked, so the copy overlaps with the running step
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=True)
            valid_hw = torch.from_numpy(batch["valid_hw"]) if "valid_hw" in batch else None
            waited = time.perf_counter() - t0
            self.wait_seconds += waited
            if n == 0:
                self.first_wait_seconds = waited
            if self.ids is not None and "id" in batch:
                self.ids.extend(str(i) for i in batch["id"])
            yield images, valid_hw


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-rank epoch statistics over all ranks (identity with one rank)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    return dict(zip(keys, all_reduce_mean(t).tolist()))


def _write_sample_ids(run_dir: str, epoch: int, rank: int, ids: list[str]) -> None:
    """Audit record of one finished pass: ``RUN/sample_ids/epochNNNN-rankR-<attempt>.txt``, one id per line."""
    name = f"epoch{epoch:04d}-rank{rank}-{uuid.uuid4().hex[:8]}.txt"
    write_text(join(run_dir, SAMPLE_IDS_DIR, name), "\n".join(ids) + "\n")


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds the ExCB config dict, ``train_rows`` and ``run_dir``.

    Each (re)start of the worker group — first launch, restart after a failure, elastic resize — resumes from
    the newest checkpoint that verifies and restarts its epoch from the first step, with the batch, lr and
    step count of :func:`excb.run.scaling.plan_for` for the group's size.
    """
    cfg = from_dict(config["cfg"])
    console.use_real_stdout()
    configure_storage(cfg.storage)
    run_dir = config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = plan_for(cfg, world, int(config["train_rows"]))
    spe = plan.steps_per_epoch
    set_torch_threads(cfg)
    device = ray.train.torch.get_device()
    learner = ExcbLearner(cfg, spe, device=device, lr_scale=plan.lr_scale, global_batchnorm=world > 1,
                          wrap_student=ray.train.torch.prepare_model)  # moves to the device; DDP when world > 1
    shard = ray.train.get_dataset_shard("train")
    if rank == 0:
        clear_staging(run_dir)  # what a killed attempt of this run staged and never persisted

    start_epoch, history = 0, []
    try:
        state, where = load_latest(list_checkpoints(run_dir), map_location=device)
    except CheckpointError:
        state = None
    if state is not None:
        learner.load_state_dict(state)
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if rank == 0:
            console.info(f"resumed from {where}: epoch {start_epoch} done, {world} worker(s), global batch "
                         f"{plan.global_batch}, lr x{plan.lr_scale:g}")
    elif cfg.method.kmeans_init:
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
        per_rank = -(-cfg.method.kmeans_samples // world)
        feed = EpochFeed(shard, plan.per_worker_batch, spe, device, seed=rank)
        counts = learner.init_prototypes(feed, per_rank, gen)
        if rank == 0:
            console.info(f"k-means prototype init: {int((counts > 0).sum())}/{len(counts)} clusters non-empty "
                         f"({time.time() - t0:.1f}s)")
    learner.global_step = plan.start_step(start_epoch)  # after a resize, the new group's step count

    knn_data = None
    if rank == 0 and cfg.eval.epoch_knn_train > 0:
        knn_data = (load_split_arrays(cfg.data.path, "train", image_size=cfg.data.image_size,
                                      channels=cfg.data.channels, limit=cfg.eval.epoch_knn_train),
                    load_split_arrays(cfg.data.path, "test", image_size=cfg.data.image_size,
                                      channels=cfg.data.channels, limit=cfg.eval.epoch_knn_test))

    learner.train()
    for epoch in range(start_epoch, cfg.train.epochs):
        # Per-epoch seeds: a restarted epoch draws the same views and local shuffle as its interrupted attempt.
        gen = torch.Generator().manual_seed((cfg.train.seed + 1) * 100_003 + epoch * 1_009 + rank)
        t0 = time.time()
        sums = {"loss": 0.0, "teacher_confidence": 0.0, "unique_targets": 0.0, "changed_by_balancing": 0.0}
        feed = EpochFeed(shard, plan.per_worker_batch, spe, device, seed=(cfg.train.seed + 1) * 7919 + epoch * 31 + rank,
                         record_ids=cfg.train.record_sample_ids)
        for i, (images, valid_hw) in enumerate(feed):
            stats = learner.step(images, epoch, gen, valid_hw)
            for key in sums:
                sums[key] += float(getattr(stats, key))
            if rank == 0 and cfg.train.log_every_steps and (i + 1) % cfg.train.log_every_steps == 0:
                console.info(f"epoch {epoch + 1} step {i + 1}/{spe} loss {stats.loss:.4f}")
        seconds = time.time() - t0
        if feed.ids is not None:
            _write_sample_ids(run_dir, epoch + 1, rank, feed.ids)
        metrics = _mean_over_ranks({**{k: v / spe for k, v in sums.items()},
                                    "data_wait_fraction": feed.wait_seconds / seconds,
                                    "first_batch_seconds": feed.first_wait_seconds}, device)
        step = learner.global_step
        metrics.update(epoch=epoch + 1, step=step, lr=float(learner.schedules.lr[step - 1]), workers=world,
                       global_batch=plan.global_batch, steps_per_epoch=spe, epoch_seconds=seconds,
                       images_per_second=spe * plan.global_batch / seconds,
                       **estimate_stats(learner.balancer.sizes.cpu()))
        if knn_data is not None:
            (trx, try_), (tex, tey) = knn_data
            ev = evaluate_teacher(learner.teacher, learner.augment, torch.from_numpy(trx), try_,
                                  torch.from_numpy(tex), tey, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                                  linear_probe=False)  # per epoch: kNN and clustering only
            metrics.update({f"subset_{k}": v for k, v in ev.items()})
        history.append(metrics)
        checkpoint, staged = None, None
        if rank == 0:
            state = training_state(learner, epoch + 1, history, cfg)
            staged = new_local_state_dir(state, run_dir)
            checkpoint = ray.train.Checkpoint.from_directory(staged)
            write_metrics(run_dir, history)
            knn = f" knn(subset) {metrics['subset_knn_top1']:.2f}%" if "subset_knn_top1" in metrics else ""
            console.info(f"epoch {epoch + 1}/{cfg.train.epochs} loss {metrics['loss']:.4f}{knn} "
                         f"{metrics['images_per_second']:.0f} img/s, data wait "
                         f"{100 * metrics['data_wait_fraction']:.1f}%, max share "
                         f"x{metrics['estimate_max_cluster_share_x_uniform']:.2f} ({seconds:.0f}s, {world} worker(s))")
        try:  # the report persists the checkpoint synchronously: the staged copy is not needed after it either way
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch + 1))
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
