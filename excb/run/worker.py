"""The Ray Train worker loop: plain PyTorch plus ``get_dataset_shard``, ``report`` and checkpoints.

Every rank runs exactly the same number of steps per epoch. After each epoch rank 0 writes a checkpoint (model,
teacher, optimiser, balancer, step, epoch, metric history) and reports the epoch's metrics; with
``train.checkpoint_every_steps`` / ``checkpoint_every_minutes`` it also writes checkpoints inside the epoch, which
hold the epoch's position (:class:`EpochPosition`). Relaunching the run resumes from the newest checkpoint that
verifies, so the final state has each epoch, and each step of it, exactly once.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch

from excb import console
from excb.config import ExcbConfig, from_dict, redacted_dict
from excb.data.pipeline import load_split_arrays
from excb.data.skip_list import clear_skip_list, id_hashes, write_skip_list
from excb.distributed import all_gather_cat, all_reduce_mean, all_reduce_sum
from excb.evaluation.evaluate import evaluate_teacher
from excb.evaluation.metrics import estimate_stats
from excb.method.learner import ExcbLearner
from excb.method.step import STAT_KEYS
from excb.run.progress import ProgressMeter
from excb.run.scaling import GroupPlan, plan_for
from excb.run.stat_sums import StatSums
from excb.run.tracking import NULL_TRACKER, Tracker, open_trackers
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
from excb.storage import join, resolve_fs, write_text


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
    """Exactly ``steps`` batches ``(images uint8 [B, C, S, S], valid_hw int [B, 2] or None, ids)`` from this
    worker's shard for one pass, timing the wait for data (``valid_hw``: each image's size in its canvas, see
    ``data.train_decode``; None when the dataset has no such column; ``ids``: the batch's sample ids, or None).

    The order is Ray Data's block order for this pass (randomised per pass) refined by a local shuffle buffer
    seeded with ``seed``; ``wait_seconds`` is the time spent waiting for the next batch (not hidden by prefetch),
    ``first_wait_seconds`` the part of it spent on the first batch (the pass's start-up).
    """

    def __init__(self, shard: Any, batch_size: int, steps: int, device: torch.device, seed: int) -> None:
        self.shard, self.batch_size, self.steps, self.device, self.seed = shard, batch_size, steps, device, seed
        self.wait_seconds = self.first_wait_seconds = 0.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, np.ndarray | None]]:
        if self.steps <= 0:  # nothing left of this pass (a resume at its very end): do not start one
            return
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
            yield images, valid_hw, batch.get("id")


@dataclass
class EpochPosition:
    """How far into an epoch a run is, as a mid-epoch checkpoint records it.

    ``images``: samples consumed in the epoch by all ranks together; ``consumed``: their id hashes
    (:func:`excb.data.skip_list.id_hashes`); ``sums``: the per-step statistics summed over those steps (mean over
    ranks); ``seconds`` / ``wait_seconds``: training and data-wait time spent on them.
    """

    images: int = 0
    steps: int = 0  # steps whose statistics ``sums`` holds (differs from images / batch after a resize)
    consumed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0.0))
    seconds: float = 0.0
    wait_seconds: float = 0.0

    def to_state(self) -> dict[str, Any]:
        return {"epoch_images": self.images, "epoch_steps": self.steps,
                "epoch_consumed": torch.from_numpy(self.consumed),
                "epoch_sums": dict(self.sums), "epoch_seconds": self.seconds,
                "epoch_wait_seconds": self.wait_seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochPosition:
        """The position a checkpoint holds (empty at an epoch boundary)."""
        if not int(state.get("epoch_images", 0)):
            return cls()
        return cls(images=int(state["epoch_images"]), steps=int(state.get("epoch_steps", 0)),
                   consumed=state["epoch_consumed"].numpy().astype(np.int64),
                   sums={k: float(state["epoch_sums"].get(k, 0.0)) for k in STAT_KEYS},
                   seconds=float(state["epoch_seconds"]), wait_seconds=float(state["epoch_wait_seconds"]))


def step_seed(seed: int, epoch: int, rank: int, step_in_epoch: int) -> int:
    """Seed of the view randomness of one step: a function of (seed, epoch, rank, step), so a run resumed inside
    an epoch draws the same views for a step as the interrupted attempt would have."""
    return (((seed + 1) * 100_003 + epoch * 1_009 + rank) * 1_000_003 + step_in_epoch) % (2 ** 63)


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-rank statistics over all ranks (identity with one rank)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    return dict(zip(keys, all_reduce_mean(t).tolist()))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (one small collective)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def _write_sample_ids(run_dir: str, epoch: int, rank: int, first: int, end: int, ids: list[str]) -> None:
    """Audit record of one stretch of a pass that ended in a checkpoint (the whole pass, or the part up to a
    mid-epoch checkpoint): ``RUN/sample_ids/epochNNNN-rankR-FFFFFFFFFFFF-EEEEEEEEEEEE-<attempt>.txt``, one id per
    line, where F and E are the epoch's global image counts at the start and end of the stretch."""
    name = f"epoch{epoch:04d}-rank{rank}-{first:012d}-{end:012d}-{uuid.uuid4().hex[:8]}.txt"
    write_text(join(run_dir, SAMPLE_IDS_DIR, name), "\n".join(ids) + "\n")


def report_checkpoint(metrics: dict[str, Any], state: dict[str, Any] | None, run_dir: str, name: str) -> None:
    """``ray.train.report`` on every rank; rank 0 (``state`` given) stages its checkpoint locally first. The
    report persists it synchronously, so the staged copy is removed after it either way."""
    staged = new_local_state_dir(state, run_dir) if state is not None else None
    checkpoint = ray.train.Checkpoint.from_directory(staged) if staged is not None else None
    try:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)


class MidEpochTimer:
    """When to write a checkpoint inside an epoch: every ``train.checkpoint_every_steps`` steps and/or once
    ``train.checkpoint_every_minutes`` have passed since the last one (rank 0's clock, checked at log steps and
    agreed on by all ranks)."""

    def __init__(self, cfg: ExcbConfig) -> None:
        self.every_steps = cfg.train.checkpoint_every_steps
        self.every_seconds = 60 * cfg.train.checkpoint_every_minutes if cfg.train.checkpoint_every_minutes else None
        self.log_every = cfg.train.log_every_steps
        self.last = time.monotonic()

    @property
    def enabled(self) -> bool:
        return bool(self.every_steps or self.every_seconds)

    def due(self, step_in_epoch: int, steps_per_epoch: int, rank: int, device: torch.device) -> bool:
        """After step ``step_in_epoch`` (1-based) of the epoch; never at its last step (the epoch's own checkpoint
        follows)."""
        if not self.enabled or step_in_epoch >= steps_per_epoch:
            return False
        if self.every_steps and step_in_epoch % self.every_steps == 0:
            return True
        if self.every_seconds and step_in_epoch % self.log_every == 0:
            return _any_rank(rank == 0 and time.monotonic() - self.last >= self.every_seconds, device)
        return False

    def reset(self) -> None:
        self.last = time.monotonic()


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds the ExCB config dict, ``train_rows`` and ``run_dir``.

    Each (re)start of the worker group — first launch, restart after a failure, elastic resize — resumes from
    the newest checkpoint that verifies, with the batch, lr and step count of :func:`excb.run.scaling.plan_for`
    for the group's size. A checkpoint written inside an epoch resumes that epoch at its next step: the samples
    already consumed are left out of the rest of the pass (:mod:`excb.data.skip_list`), the views of each step are
    seeded by (seed, epoch, rank, step) and the epoch's statistics carry over.
    """
    cfg = from_dict(config["cfg"])
    console.use_real_stdout()
    configure_storage(cfg.storage)
    run_dir = config["run_dir"]
    run_fs, run_path = resolve_fs(run_dir)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = plan_for(cfg, world, int(config["train_rows"]))
    spe, gb = plan.steps_per_epoch, plan.global_batch
    set_torch_threads(cfg)
    device = ray.train.torch.get_device()
    learner = ExcbLearner(cfg, spe, device=device, lr_scale=plan.lr_scale, global_batchnorm=world > 1,
                          wrap_student=ray.train.torch.prepare_model)  # moves to the device; DDP when world > 1
    shard = ray.train.get_dataset_shard("train")
    if rank == 0:
        clear_staging(run_dir)  # what a killed attempt of this run staged and never persisted

    start_epoch, history, position = 0, [], EpochPosition()
    try:
        state, where = load_latest(list_checkpoints(run_dir), map_location=device)
    except CheckpointError:
        state = None
    if state is not None:
        learner.load_state_dict(state)
        start_epoch, history = int(state["epoch"]), list(state["history"])
        position = EpochPosition.from_state(state)
        if rank == 0:
            into = f", {position.images} images into epoch {start_epoch + 1}" if position.images else ""
            console.info(f"resumed from {where}: epoch {start_epoch} done{into}, {world} worker(s), global batch "
                         f"{gb}, lr x{plan.lr_scale:g}")
    elif cfg.method.kmeans_init:
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
        per_rank = -(-cfg.method.kmeans_samples // world)
        feed = EpochFeed(shard, plan.per_worker_batch, spe, device, seed=rank)
        counts = learner.init_prototypes(feed, per_rank, gen)
        if rank == 0:
            console.info(f"k-means prototype init: {int((counts > 0).sum())}/{len(counts)} clusters non-empty "
                         f"({time.time() - t0:.1f}s)")
    if rank == 0:  # before any rank starts a pass: Ray Data runs one only when every rank has asked for it
        if position.images:
            write_skip_list(run_fs, run_path, position.consumed)
        else:
            clear_skip_list(run_fs, run_path)

    knn_data = None
    if rank == 0 and cfg.eval.epoch_knn_train > 0:
        knn_data = (load_split_arrays(cfg.data.path, "train", image_size=cfg.data.image_size,
                                      channels=cfg.data.channels, limit=cfg.eval.epoch_knn_train),
                    load_split_arrays(cfg.data.path, "test", image_size=cfg.data.image_size,
                                      channels=cfg.data.channels, limit=cfg.eval.epoch_knn_test))

    timer = MidEpochTimer(cfg)
    track_ids = timer.enabled or cfg.train.record_sample_ids
    resume_step = plan.start_step(start_epoch) + min(-(-position.images // gb), spe)
    tracker = open_trackers(cfg, run_dir, resume_step=resume_step) if rank == 0 else NULL_TRACKER
    progress = ProgressMeter(cfg.train.epochs, spe, gb, resume_step)
    me = RankContext(cfg, learner, shard, plan, rank, world, device, run_dir)
    try:
        _train_epochs(me, start_epoch, position, history, knn_data, timer, track_ids, tracker, progress)
    finally:
        tracker.close()


@dataclass(frozen=True)
class RankContext:
    """What one rank of the worker group trains with."""

    cfg: ExcbConfig
    learner: ExcbLearner
    shard: Any
    plan: GroupPlan
    rank: int
    world: int
    device: torch.device
    run_dir: str


def _train_epochs(me: RankContext, start_epoch: int, position: EpochPosition, history: list[dict[str, Any]],
                  knn_data: Any, timer: MidEpochTimer, track_ids: bool, tracker: Tracker,
                  progress: ProgressMeter) -> None:
    """The epochs from ``start_epoch`` (resumed at ``position`` inside it): steps, a progress line and tracker
    scalars every ``train.log_every_steps``, checkpoints inside epochs when ``timer`` says so and at their ends."""
    cfg, learner, shard, plan, rank, world, device, run_dir = (me.cfg, me.learner, me.shard, me.plan, me.rank,
                                                               me.world, me.device, me.run_dir)
    spe, gb = plan.steps_per_epoch, plan.global_batch
    run_fs, run_path = resolve_fs(run_dir)
    learner.train()
    for epoch in range(start_epoch, cfg.train.epochs):
        before = position if epoch == start_epoch else EpochPosition()
        done = min(-(-before.images // gb), spe)  # steps of this group's size already trained in this epoch
        learner.global_step = plan.start_step(epoch) + done
        gen = torch.Generator()
        t0 = time.time()
        stat_sums = StatSums(device, epoch=epoch)  # this attempt's, this rank's, on the device
        hashes: list[np.ndarray] = []  # ids this rank consumed in this epoch, in this attempt
        audit: list[str] = []  # ids since the last checkpoint (train.record_sample_ids)
        audit_first = before.images
        feed = EpochFeed(shard, plan.per_worker_batch, spe - done, device,
                         seed=(cfg.train.seed + 1) * 7919 + epoch * 31 + rank + 7 * done)
        interval = (t0, 0.0, done)  # start of the logging interval: time, data wait so far, steps
        for n, (images, valid_hw, ids) in enumerate(feed):
            i = done + n + 1  # steps of the epoch done after this one
            gen.manual_seed(step_seed(cfg.train.seed, epoch, rank, i - 1))
            stats = learner.step(images, epoch, gen, valid_hw, check_finite=False)  # no host sync per step
            stat_sums.add(stats, learner.global_step - 1)
            if track_ids and ids is not None:
                hashes.append(id_hashes(ids))
                if cfg.train.record_sample_ids:
                    audit.extend(str(x) for x in ids)
            if rank == 0 and cfg.train.log_every_steps and i % cfg.train.log_every_steps == 0:
                last = stat_sums.read().last  # the interval's one read of the device (and its finite-loss check)
                now_t = time.time()
                console.info(progress.update(epoch, i, learner.global_step, last["loss"], now_t - interval[0],
                                             feed.wait_seconds - interval[1]))
                tracker.log_step(learner.global_step, {
                    "loss": last["loss"], "lr": float(learner.schedules.lr[learner.global_step - 1]),
                    "teacher_confidence": last["teacher_confidence"],
                    "changed_by_balancing": last["changed_by_balancing"],
                    "unique_targets": last["unique_targets"],
                    "images_per_second": (i - interval[2]) * gb / max(now_t - interval[0], 1e-9)})
                interval = (now_t, feed.wait_seconds, i)
            if timer.due(i, spe, rank, device):
                sums = stat_sums.read().sums  # raises on a non-finite loss: nothing bad is checkpointed
                images_done = before.images + (n + 1) * gb
                mine = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.int64)
                everyone = all_gather_cat(torch.from_numpy(mine).to(device)).cpu().numpy()
                mean = _mean_over_ranks({**sums, "wait": feed.wait_seconds}, device)
                now = EpochPosition(images=images_done, steps=before.steps + n + 1,
                                    consumed=np.concatenate([before.consumed, everyone]),
                                    sums={k: before.sums[k] + mean[k] for k in STAT_KEYS},
                                    seconds=before.seconds + time.time() - t0,
                                    wait_seconds=before.wait_seconds + mean["wait"])
                if cfg.train.record_sample_ids:
                    _write_sample_ids(run_dir, epoch + 1, rank, audit_first, images_done, audit)
                    audit, audit_first = [], images_done
                state = ({**training_state(learner, epoch, history, cfg), **now.to_state()} if rank == 0
                         else None)
                report_checkpoint({"epoch": epoch, "epoch_images": images_done, "step": learner.global_step,
                         "mid_epoch": True}, state, run_dir, checkpoint_dir_name(epoch, images_done))
                timer.reset()
                if rank == 0:
                    console.info(f"checkpoint inside epoch {epoch + 1}: step {i}/{spe}, {images_done} images")
        if rank == 0 and before.images:
            clear_skip_list(run_fs, run_path)  # later passes are whole again
        seconds = before.seconds + time.time() - t0
        images_end = before.images + feed.steps * gb
        if cfg.train.record_sample_ids:
            _write_sample_ids(run_dir, epoch + 1, rank, audit_first, images_end, audit)
        sums = stat_sums.read().sums
        mean = _mean_over_ranks({**sums, "wait": feed.wait_seconds, "first": feed.first_wait_seconds}, device)
        trained = before.steps + feed.steps  # = spe unless the group's size changed inside the epoch
        metrics = {k: (before.sums[k] + mean[k]) / max(trained, 1) for k in STAT_KEYS}
        metrics.update(data_wait_fraction=(before.wait_seconds + mean["wait"]) / max(seconds, 1e-9),
                       first_batch_seconds=mean["first"])
        step = learner.global_step
        metrics.update(epoch=epoch + 1, step=step, lr=float(learner.schedules.lr[step - 1]), workers=world,
                       global_batch=gb, steps_per_epoch=spe, epoch_seconds=seconds,
                       images_per_second=images_end / seconds, **estimate_stats(learner.balancer.sizes.cpu()))
        if before.images:
            metrics["resumed_at_images"] = before.images
        if knn_data is not None:
            (trx, try_), (tex, tey) = knn_data
            ev = evaluate_teacher(learner.teacher, learner.augment, torch.from_numpy(trx), try_,
                                  torch.from_numpy(tex), tey, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                                  linear_probe=False)  # per epoch: kNN and clustering only
            metrics.update({f"subset_{k}": v for k, v in ev.items()})
        history.append(metrics)
        tracker.log_epoch(epoch + 1, step, metrics)
        state = None
        if rank == 0:
            state = training_state(learner, epoch + 1, history, cfg)
            write_metrics(run_dir, history)
            knn = f" knn(subset) {metrics['subset_knn_top1']:.2f}%" if "subset_knn_top1" in metrics else ""
            console.info(f"epoch {epoch + 1}/{cfg.train.epochs} loss {metrics['loss']:.4f}{knn} "
                         f"{metrics['images_per_second']:.0f} img/s, data wait "
                         f"{100 * metrics['data_wait_fraction']:.1f}%, max share "
                         f"x{metrics['estimate_max_cluster_share_x_uniform']:.2f} ({seconds:.0f}s, {world} worker(s))")
        report_checkpoint(metrics, state, run_dir, checkpoint_dir_name(epoch + 1))
        timer.reset()
