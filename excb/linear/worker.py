"""The Ray Train loop of ``excb linear``: linear heads on the frozen teacher backbone (see
:mod:`excb.linear.heads` for the objective and schedule, :mod:`excb.linear.views` for the images).

Every (re)start of the worker group resumes from the newest checkpoint in the evaluation folder that verifies
(heads, optimiser, epochs done, history), so a killed worker costs at most the epoch in progress. Gradients of
the heads are averaged over the ranks before each step (the batch is split, the loss is a per-rank mean).
The validation split is not split by Ray: every rank reads it and scores the rows whose id hash h(id) satisfies
h(id) mod W = rank, so every image is scored exactly once, whatever order Ray Data delivers the blocks in.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn

from excb import console
from excb.config import from_dict
from excb.data.skip_list import id_hashes
from excb.distributed import is_distributed
from excb.evaluation.features import load_teacher
from excb.linear.config import LinearConfig, linear_from_dict
from excb.linear.heads import LinearHeads, cosine_factor, set_lrs, topk_correct
from excb.linear.views import eval_view, train_view
from excb.method.model import ExcbNetwork
from excb.method.step import autocast_dtype_for
from excb.run.worker import report_checkpoint
from excb.rundir.checkpoint import (
    CheckpointError,
    checkpoint_dir_name,
    clear_staging,
    list_checkpoints,
    load_latest,
    read_state_dir,
)
from excb.rundir.runfiles import write_metrics
from excb.storage import configure as configure_storage


def _autocast(lc: LinearConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    dtype = torch.float16 if lc.precision == "fp16" and device.type == "cuda" else \
        autocast_dtype_for("fp32" if lc.precision == "fp16" else lc.precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _frozen_teacher(checkpoint: str, device: torch.device) -> ExcbNetwork:
    """The teacher of the pretraining checkpoint, in eval mode, without gradients; the heads read
    :meth:`~excb.method.model.ExcbNetwork.backbone_features`, the backbone fed as in pretraining (NHWC inputs where
    ``model.channels_last``, the weights' layout)."""
    state = read_state_dir(checkpoint)
    teacher, _ = load_teacher(state, checkpoint)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _average_gradients(heads: nn.Module, world: int) -> None:
    """grad ← (1/W) Σ_ranks grad, one all-reduce over the flattened gradients."""
    if not is_distributed() or world == 1:
        return
    grads = [p.grad for p in heads.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _batches(shard: Any, batch_size: int, steps: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Exactly ``steps`` full batches of this rank's training shard for one pass (locally shuffled)."""
    it = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                 local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed))
    for n in range(steps):
        try:
            yield next(it)
        except StopIteration:
            raise RuntimeError(f"data shard ran out after {n} of {steps} steps; every rank needs the same step "
                               "count") from None


@torch.no_grad()
def evaluate_heads(shard: Any, features: Callable[[Tensor], Tensor], heads: LinearHeads, lc: LinearConfig,
                   mean: list[float], std: list[float], device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """Top-1 / top-5 (percent) of every head on the validation split (``features``: image batch → backbone
    features), each row scored on one rank only."""
    heads.eval()
    n_heads = len(heads.lrs)
    top1 = torch.zeros(n_heads, dtype=torch.float64, device=device)
    top5 = torch.zeros(n_heads, dtype=torch.float64, device=device)
    rows = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in shard.iter_batches(batch_size=lc.per_worker_batch, batch_format="numpy"):
        mine = id_hashes(batch["id"]) % world == rank
        if not mine.any():
            continue
        images = torch.from_numpy(batch["image"][mine]).to(device)
        labels = torch.from_numpy(np.asarray(batch["label"])[mine].astype(np.int64)).to(device)
        with _autocast(lc, device):
            feats = features(eval_view(images, lc, mean, std))
        c1, c5 = topk_correct(heads(feats.float()), labels)
        top1 += c1
        top5 += c5
        rows += labels.numel()
    if is_distributed():
        for t in (top1, top5, rows):
            dist.all_reduce(t)
    n = max(float(rows.item()), 1.0)
    t1, t5 = (100.0 * top1 / n).tolist(), (100.0 * top5 / n).tolist()
    best = int(np.argmax(t1))
    at_lr = int(np.argmin([abs(v - lc.lr) for v in heads.lrs]))
    return {"val_rows": int(rows.item()), "top1": t1[at_lr], "top5": t5[at_lr], "best_top1": t1[best],
            "best_top5": t5[best], "best_lr": heads.lrs[best], "top1_per_head": t1}


def linear_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config``: ``linear`` (the linear config), ``cfg`` (the pretraining config, data
    path resolved), ``checkpoint`` (the pretraining checkpoint directory), ``out_dir``, ``num_classes``,
    ``steps_per_epoch``."""
    lc = linear_from_dict(config["linear"])
    cfg = from_dict(config["cfg"])
    console.use_real_stdout()
    configure_storage(cfg.storage)
    out_dir, spe = config["out_dir"], int(config["steps_per_epoch"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(lc.torch_threads or os.cpu_count() or 1)
    device = ray.train.torch.get_device()
    teacher = _frozen_teacher(config["checkpoint"], device)
    heads = LinearHeads(int(teacher.backbone.out_dim), int(config["num_classes"]), lc.head_lrs(),
                        seed=lc.seed).to(device)
    optimizer = heads.optimizer(lc.momentum, lc.weight_decay)
    if rank == 0:
        clear_staging(out_dir)
    start_epoch, history = 0, []
    try:
        state, where = load_latest(list_checkpoints(out_dir), map_location=device)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if rank == 0:
            console.info(f"linear evaluation resumed from {where}: epoch {start_epoch} of {lc.epochs} done")
    except CheckpointError:
        pass
    mean, std = list(cfg.data.mean), list(cfg.data.std)
    total = lc.epochs * spe
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, lc.epochs):
        heads.train()
        gen = torch.Generator().manual_seed(lc.seed * 1_000_003 + epoch * 1009 + rank)
        loss_sum, t0, waited = 0.0, time.perf_counter(), 0.0
        t_wait = time.perf_counter()
        for i, batch in enumerate(_batches(train_shard, lc.per_worker_batch, spe, gen.initial_seed() % 2**31)):
            waited += time.perf_counter() - t_wait
            step = epoch * spe + i
            set_lrs(optimizer, cosine_factor(step, total))
            images = torch.from_numpy(batch["image"]).to(device, non_blocking=True)
            valid_hw = torch.from_numpy(batch["valid_hw"]) if "valid_hw" in batch else None
            labels = torch.from_numpy(np.asarray(batch["label"]).astype(np.int64)).to(device)
            with torch.no_grad(), _autocast(lc, device):
                feats = teacher.backbone_features(train_view(images, valid_hw, lc, mean, std, gen))
            loss = heads.loss(heads(feats.float()), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(heads, world)
            optimizer.step()
            loss_sum += float(loss.detach())
            if rank == 0 and lc.log_every_steps and (i + 1) % lc.log_every_steps == 0:
                console.info(f"linear epoch {epoch + 1}/{lc.epochs} step {i + 1}/{spe} "
                             f"loss/head {loss_sum / (i + 1) / len(heads.lrs):.4f}")
            t_wait = time.perf_counter()
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "step": (epoch + 1) * spe, "workers": world,
                               "loss_per_head": loss_sum / spe / len(heads.lrs), "epoch_seconds": seconds,
                               "images_per_second": spe * lc.batch_size / seconds if seconds else 0.0,
                               "data_wait_fraction": waited / seconds if seconds else 0.0}
        last = epoch + 1 == lc.epochs
        if last or (lc.eval_every_epochs and (epoch + 1) % lc.eval_every_epochs == 0):
            row.update(evaluate_heads(val_shard, teacher.backbone_features, heads, lc, mean, std, device, rank, world))
        history.append(row)
        state = None
        if rank == 0:
            state = {"heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "step": (epoch + 1) * spe, "history": history, "linear": lc.to_dict(),
                     "pretraining_checkpoint": config["checkpoint"]}
            write_metrics(out_dir, history)
            shown = f", val top-1 {row['top1']:.2f} % (best head {row['best_top1']:.2f} %)" if "top1" in row else ""
            console.info(f"linear epoch {epoch + 1}/{lc.epochs}: loss/head {row['loss_per_head']:.4f}, "
                         f"{row['images_per_second']:.0f} img/s{shown}")
        metrics = {k: v for k, v in row.items() if not isinstance(v, list)}
        report_checkpoint(metrics, state, out_dir, checkpoint_dir_name(epoch + 1))


__all__ = ["evaluate_heads", "linear_worker"]
