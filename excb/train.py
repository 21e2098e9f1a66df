"""The Ray Train worker loop: plain PyTorch plus ``get_dataset_shard``, ``report`` and checkpoints.

Every rank runs exactly ``steps_per_epoch`` steps per epoch. After each epoch rank 0 writes a checkpoint (model,
teacher, optimiser, balancer, step, epoch, metric history) and reports the epoch's metrics; relaunching the run
resumes from the newest checkpoint that verifies, so the final state has each epoch exactly once.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from excb.augment import MultiCropAugment
from excb.balancing import ClusterBalancer
from excb.checkpoint import CheckpointError, checkpoint_dir_name, list_checkpoints, load_latest, new_local_state_dir
from excb.config import ExcbConfig, from_dict
from excb.data.pipeline import load_split_arrays
from excb.engine import StepStats, build_optimizer, init_prototypes_kmeans, train_step
from excb.evaluate import evaluate_teacher
from excb.metrics import estimate_stats
from excb.model import ExcbNetwork, build_student_teacher, unwrap
from excb.runfiles import write_metrics
from excb.schedules import build_schedules


def say(message: str) -> None:
    """One progress line on the worker's real stdout, which Ray forwards to the driver once (Ray Train's patched
    ``print`` would also copy it through its logger, so every line would show twice)."""
    print(message, file=sys.__stdout__, flush=True)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def training_state(student: nn.Module, teacher: ExcbNetwork, balancer: ClusterBalancer,
                   optimizer: torch.optim.Optimizer, epoch: int, step: int, history: list[dict[str, Any]],
                   cfg: ExcbConfig) -> dict[str, Any]:
    """Everything a resume needs, as plain tensors, numbers and strings (loadable with weights_only=True)."""
    return {"student": unwrap(student).state_dict(), "teacher": teacher.state_dict(),
            "balancer": balancer.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "step": step, "history": history, "config": cfg.to_dict()}


def _batches(shard: Any, batch_size: int, steps: int, device: torch.device, seed: int):
    """Exactly ``steps`` uint8 image batches from this worker's shard (one pass, local shuffle)."""
    it = shard.iter_torch_batches(batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=4 * batch_size,
                                  local_shuffle_seed=seed, device=device)
    n = 0
    for batch in it:
        if n == steps:
            break
        yield batch["image"]
        n += 1
    if n < steps:
        raise RuntimeError(f"data shard ran out after {n} of {steps} steps; every rank needs the same step count")


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-rank epoch statistics over all ranks (identity with one rank)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds the ExCB config dict, ``steps_per_epoch`` and ``run_dir``."""
    cfg = from_dict(config["cfg"])
    spe, run_dir = int(config["steps_per_epoch"]), config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads or os.cpu_count() or 1)
    _seed_everything(cfg.train.seed)
    device = ray.train.torch.get_device()
    student, teacher = build_student_teacher(cfg)
    teacher.to(device)
    if world > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student = ray.train.torch.prepare_model(student)  # moves to the device; DDP when world > 1
    balancer = ClusterBalancer(cfg.model.num_prototypes, cfg.method.balance_momentum, cfg.method.argmax_boost).to(device)
    optimizer = build_optimizer(cfg, student)
    schedules = build_schedules(cfg, spe)
    augment = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    per_worker = cfg.train.batch_size // world
    shard = ray.train.get_dataset_shard("train")

    start_epoch, step, history = 0, 0, []
    try:
        state, where = load_latest(list_checkpoints(run_dir), map_location=device)
    except CheckpointError:
        state = None
    if state is not None:
        unwrap(student).load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        balancer.load_state_dict(state["balancer"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        if rank == 0:
            say(f"[excb] resumed from {where}: epoch {start_epoch}, step {step}")
    elif cfg.method.kmeans_init:
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
        per_rank = -(-cfg.method.kmeans_samples // world)
        counts = init_prototypes_kmeans(cfg, student, teacher, _batches(shard, per_worker, spe, device, rank),
                                        augment, gen, per_rank)
        if rank == 0:
            say(f"[excb] k-means prototype init: {int((counts > 0).sum())}/{len(counts)} clusters non-empty "
                f"({time.time() - t0:.1f}s)")

    knn_data = None
    if rank == 0 and cfg.eval.epoch_knn_train > 0:
        knn_data = (load_split_arrays(cfg.data.path, "train", image_size=cfg.data.image_size,
                                      channels=cfg.data.channels, limit=cfg.eval.epoch_knn_train),
                    load_split_arrays(cfg.data.path, "test", image_size=cfg.data.image_size,
                                      channels=cfg.data.channels, limit=cfg.eval.epoch_knn_test))

    student.train()
    teacher.train()
    for epoch in range(start_epoch, cfg.train.epochs):
        # Per-epoch seeds: a resumed epoch draws the same views as it would have without the interruption.
        gen = torch.Generator().manual_seed((cfg.train.seed + 1) * 100_003 + epoch * 1_009 + rank)
        t0 = time.time()
        sums = {"loss": 0.0, "teacher_confidence": 0.0, "unique_targets": 0.0, "changed_by_balancing": 0.0}
        for i, images in enumerate(_batches(shard, per_worker, spe, device, seed=epoch * 7919 + rank)):
            stats: StepStats = train_step(cfg, student, teacher, balancer, optimizer, augment, schedules, images,
                                          step, epoch, gen)
            for key in sums:
                sums[key] += float(getattr(stats, key))
            step += 1
            if rank == 0 and cfg.train.log_every_steps and (i + 1) % cfg.train.log_every_steps == 0:
                say(f"[excb] epoch {epoch + 1} step {i + 1}/{spe} loss {stats.loss:.4f}")
        seconds = time.time() - t0
        metrics = _mean_over_ranks({k: v / spe for k, v in sums.items()}, device)
        metrics.update(epoch=epoch + 1, step=step, lr=float(schedules.lr[step - 1]),
                       epoch_seconds=seconds, images_per_second=spe * cfg.train.batch_size / seconds,
                       **estimate_stats(balancer.sizes.cpu()))
        if knn_data is not None:
            (trx, try_), (tex, tey) = knn_data
            ev = evaluate_teacher(teacher, augment, torch.from_numpy(trx), try_, torch.from_numpy(tex), tey,
                                  k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
            metrics.update({f"subset_{k}": v for k, v in ev.items()})
        history.append(metrics)
        checkpoint = None
        if rank == 0:
            state = training_state(student, teacher, balancer, optimizer, epoch + 1, step, history, cfg)
            checkpoint = ray.train.Checkpoint.from_directory(new_local_state_dir(state))
            write_metrics(run_dir, history)
            knn = f" knn(subset) {metrics['subset_knn_top1']:.2f}%" if "subset_knn_top1" in metrics else ""
            say(f"[excb] epoch {epoch + 1}/{cfg.train.epochs} loss {metrics['loss']:.4f}{knn} "
                f"{metrics['images_per_second']:.0f} img/s max share x{metrics['estimate_max_cluster_share_x_uniform']:.2f} "
                f"({seconds:.0f}s)")
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch + 1))
