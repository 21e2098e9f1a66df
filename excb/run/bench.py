"""``excb bench``: how fast one configuration trains, and what the Ray path costs.

For a config (file + overrides, as for ``excb pretrain``) it measures images per second four ways:

- ``data``: the train dataset exactly as the trainer gets it (:func:`excb.run.pretrain.training_dataset`), iterated the
  way a worker iterates its shard (:class:`excb.run.worker.EpochFeed`: batch, drop_last, local shuffle), no model;
- ``synthetic``: the learner's step (:func:`excb.method.step.train_step`) on one in-memory uint8 batch, no Ray,
  with a worker's torch threads, and the time of each phase of the step (:class:`excb.method.step.PhaseTimer`, in
  a separate run: it synchronises);
- ``plain``: the same step in a plain PyTorch loop over the same decoded images (reshuffled every pass), no Ray;
- ``end_to_end``: a real ``TorchTrainer`` run with one worker (:func:`excb.run.worker.train_worker`) over the real data,
  two epochs of ``steps`` steps (``train.max_steps_per_epoch``): the first is warm-up (compilation, allocator,
  first pass), the second is measured without the wait for its first batch (a pass's start-up, paid once per
  epoch), with the share of that time spent waiting for data;

then ``end_to_end / synthetic`` and ``end_to_end / plain``. Every measurement uses one worker's batch and skips
what is not throughput: per-epoch kNN, k-means initialisation, sample-id records, step logs.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from excb import console
from excb.config import ExcbConfig, from_dict, redacted_dict, validate
from excb.method.learner import ExcbLearner
from excb.method.step import PhaseTimer

PHASES = ("views", "teacher", "balance", "student", "loss_backward", "optimizer", "ema", "estimate")


def bench_config(cfg: ExcbConfig) -> ExcbConfig:
    """A copy of ``cfg`` for one worker, without what is not throughput (per-epoch kNN, k-means init, logs)."""
    out = from_dict(cfg.to_dict())
    out.train.num_workers = 1
    out.train.log_every_steps = 0
    out.train.record_sample_ids = False
    out.method.kmeans_init = False
    out.eval.epoch_knn_train = 0
    out.eval.final_eval = False
    return validate(out)


def bench_device(cfg: ExcbConfig) -> torch.device:
    """The device a worker of this config trains on."""
    return torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    """Wall seconds of ``n`` calls of ``fn``, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def measure_data(dataset: Any, rows: int, batch: int, steps: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Images/s of ``dataset`` iterated as a worker's :class:`~excb.run.worker.EpochFeed` (no model): ``warmup``
    batches, then ``steps`` timed ones, over as many passes as that takes (a pass starting in the timed part
    counts its start-up)."""
    from excb.run.worker import EpochFeed

    per_pass = rows // batch
    if per_pass < 1:
        raise ValueError(f"{rows} rows are fewer than one batch of {batch}")
    consumed, passes = 0, 0
    t0 = time.perf_counter()
    while consumed < warmup + steps:
        feed = EpochFeed(dataset, batch, min(per_pass, warmup + steps - consumed), torch.device("cpu"),
                         seed=seed + passes)
        for _batch in feed:
            consumed += 1
            if consumed == warmup:
                t0 = time.perf_counter()
        passes += 1
    seconds = time.perf_counter() - t0
    return {"images_per_second": steps * batch / seconds, "seconds": seconds, "steps": steps,
            "warmup_steps": warmup, "batch": batch, "passes": passes}


def measure_synthetic(cfg: ExcbConfig, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Images/s of the training step on one random in-memory uint8 batch, and the per-phase time of the step."""
    learner = ExcbLearner(cfg, warmup + 2 * steps, device=device)
    b, c, s = cfg.train.per_worker_batch, cfg.data.channels, cfg.data.image_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    x = torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=gen).to(device)
    for _ in range(warmup):
        learner.step(x)
    seconds = _timed(lambda: learner.step(x), steps, device)
    timer = PhaseTimer(device)
    for _ in range(steps):
        stats = learner.step(x, timer=timer)
    phase_s = {k: timer.seconds[k] / steps for k in PHASES if k in timer.seconds}
    phase_s.update({k: v / steps for k, v in timer.seconds.items() if k not in phase_s})
    total = sum(phase_s.values())
    return {"images_per_second": steps * b / seconds, "ms_per_step": 1000 * seconds / steps, "steps": steps,
            "warmup_steps": warmup, "batch": b, "phase_ms": {k: 1000 * v for k, v in phase_s.items()},
            "phase_share": {k: v / total for k, v in phase_s.items()}, "final_loss": float(stats.loss)}


def gather_images(dataset: Any, n: int) -> Tensor:
    """The first ``n`` decoded images of a Ray dataset as one uint8 tensor [n, C, S, S] in this process."""
    import numpy as np

    batch = dataset.limit(n).take_batch(n, batch_format="numpy")
    return torch.from_numpy(np.array(batch["image"], copy=True))  # writable, contiguous


def shuffled_batches(images: Tensor, batch: int, gen: torch.Generator, device: torch.device) -> Iterator[Tensor]:
    """Endless batches of ``images``: a new random permutation every pass, drop_last, moved to ``device``."""
    per_pass = len(images) // batch
    while True:
        perm = torch.randperm(len(images), generator=gen)
        for i in range(per_pass):
            yield images[perm[i * batch:(i + 1) * batch]].to(device, non_blocking=True)


def measure_plain(cfg: ExcbConfig, device: torch.device, images: Tensor, steps: int, warmup: int) -> dict[str, Any]:
    """Images/s of the training step in a plain PyTorch loop over in-memory decoded ``images``."""
    learner = ExcbLearner(cfg, warmup + steps, device=device)
    b = cfg.train.per_worker_batch
    batches = shuffled_batches(images, b, torch.Generator().manual_seed(cfg.train.seed + 1), device)
    for _ in range(warmup):
        learner.step(next(batches))
    seconds = _timed(lambda: learner.step(next(batches)), steps, device)
    return {"images_per_second": steps * b / seconds, "ms_per_step": 1000 * seconds / steps, "steps": steps,
            "warmup_steps": warmup, "batch": b, "images_in_memory": len(images)}


def steady_epoch(metrics: dict[str, Any]) -> dict[str, Any]:
    """Rate and data-wait share of one reported epoch, without the wait for its first batch."""
    seconds, first = float(metrics["epoch_seconds"]), float(metrics["first_batch_seconds"])
    images = int(metrics["steps_per_epoch"]) * int(metrics["global_batch"])
    steady = seconds - first
    waited = max(0.0, float(metrics["data_wait_fraction"]) * seconds - first)
    return {"images_per_second": images / steady, "data_wait_fraction": min(1.0, waited / steady),
            "epoch_images_per_second": float(metrics["images_per_second"]),
            "epoch_data_wait_fraction": float(metrics["data_wait_fraction"]), "epoch_seconds": seconds,
            "first_batch_seconds": first, "steps": int(metrics["steps_per_epoch"]),
            "batch": int(metrics["global_batch"])}


def measure_end_to_end(cfg: ExcbConfig, data: Any, steps: int, storage_path: str) -> dict[str, Any]:
    """A one-worker ``TorchTrainer`` run of two epochs of ``steps`` steps over ``data`` (the trainer's dataset);
    the second epoch's steady rate (:func:`steady_epoch`)."""
    from excb.run.pretrain import TrainingError, build_trainer
    from excb.rundir.runfiles import read_metrics

    run_cfg = from_dict(cfg.to_dict())
    run_cfg.train.epochs = 2
    run_cfg.train.max_steps_per_epoch = steps
    trainer, info = build_trainer(validate(run_cfg), storage_path, f"bench-{uuid.uuid4().hex[:8]}", data=data)
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors
        raise TrainingError(f"bench training run failed: {e}") from e
    fit_seconds = time.perf_counter() - t0
    history = read_metrics(info["run_dir"])
    if len(history) != 2:
        raise TrainingError(f"bench training run reported {len(history)} epochs, expected 2")
    return {**steady_epoch(history[-1]), "fit_seconds": fit_seconds, "warmup_epoch_seconds": history[0]["epoch_seconds"]}


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """End-to-end over the synthetic step, Ray (1 worker) over the plain loop, data pipeline over the step."""
    e2e, synth = result["end_to_end"]["images_per_second"], result["synthetic"]["images_per_second"]
    return {"end_to_end_over_synthetic": e2e / synth,
            "ray_over_plain": e2e / result["plain"]["images_per_second"],
            "data_over_synthetic": result["data"]["images_per_second"] / synth}


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, GPU and software versions of this machine."""
    import ray

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "platform": platform.platform()}


def settings(cfg: ExcbConfig, device: torch.device, threads: int, rows: int, steps: int,
             warmup: int) -> dict[str, Any]:
    """What was measured, in a line of the table."""
    a = cfg.augment
    return {"backbone": cfg.model.backbone, "batch": cfg.train.per_worker_batch, "image_size": cfg.data.image_size,
            "channels": cfg.data.channels, "crops": f"2x{a.global_size}+{a.num_local}x{a.local_size}",
            "num_prototypes": cfg.model.num_prototypes, "precision": cfg.train.precision,
            "channels_last": cfg.model.channels_last, "compile": cfg.train.compile, "device": str(device),
            "torch_threads": threads, "train_rows": rows, "steps": steps, "warmup_steps": warmup}


def run_bench(cfg: ExcbConfig, *, steps: int, warmup: int, out: str, command: str, storage_path: str | None = None,
              num_cpus: int | None = None) -> dict[str, Any]:
    """All four measurements for ``cfg``; writes the result as JSON to ``out`` (atomically) and returns it.

    The end-to-end run's checkpoints go to ``storage_path``/bench-XXXX (default: a temporary folder, deleted)."""
    from excb.run.pretrain import training_dataset
    from excb.run.scaling import plan_for
    from excb.run.startup import start_driver
    from excb.run.worker import set_torch_threads
    from excb.storage import absolute, write_json

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    cfg = start_driver(bench_config(cfg), num_cpus=num_cpus)
    device = bench_device(cfg)
    threads = set_torch_threads(cfg)
    data = training_dataset(cfg)
    plan_for(cfg, 1, data.rows)  # raises when the data is smaller than one batch
    batch = cfg.train.per_worker_batch
    result: dict[str, Any] = {
        "command": command, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "settings": settings(cfg, device, threads, data.rows, steps, warmup),
        "config": redacted_dict(cfg)}
    console.info(f"bench: data pipeline ({warmup} + {steps} batches)")
    result["data"] = measure_data(data.dataset, data.rows, batch, steps, warmup, seed=cfg.train.seed)
    console.info("bench: synthetic training step")
    result["synthetic"] = measure_synthetic(cfg, device, steps, warmup)
    console.info("bench: plain PyTorch loop")
    images = gather_images(data.dataset, min(data.rows, (warmup + steps) * batch))
    result["plain"] = measure_plain(cfg, device, images, steps, warmup)
    del images
    console.info("bench: Ray Train, 1 worker (2 epochs, the second measured)")
    tmp = tempfile.mkdtemp(prefix="excb-bench-") if storage_path is None else None
    try:
        result["end_to_end"] = measure_end_to_end(cfg, data, steps, absolute(storage_path or tmp))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["ratios"] = ratios(result)
    write_json(absolute(out), result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The measurements as a text table, the phase breakdown under it."""
    s, r = result["settings"], result["ratios"]
    synth = result["synthetic"]["images_per_second"]
    e2e = result["end_to_end"]
    rows = [("data pipeline (Ray Data, no model)", result["data"]["images_per_second"], ""),
            ("training step, synthetic batch", synth, ""),
            ("training step, plain PyTorch loop", result["plain"]["images_per_second"], ""),
            ("Ray Train, 1 worker (end to end)", e2e["images_per_second"],
             f"data wait {100 * e2e['data_wait_fraction']:.1f} %")]
    lines = [f"excb bench — {s['backbone']}, batch {s['batch']}, {s['image_size']} px x{s['channels']}, crops "
             f"{s['crops']}, K={s['num_prototypes']}, {s['precision']}, compile {'on' if s['compile'] else 'off'}, "
             f"{s['torch_threads']} threads, {s['device']}, {s['steps']} steps after {s['warmup_steps']}",
             f"{'measurement':<38}{'images/s':>10}{'vs synthetic':>14}"]
    lines += [f"{name:<38}{ips:>10.0f}{ips / synth:>13.2f}x  {note}".rstrip() for name, ips, note in rows]
    lines.append(f"end to end / synthetic step: {100 * r['end_to_end_over_synthetic']:.1f} %   "
                 f"Ray Train 1 worker / plain loop: {100 * r['ray_over_plain']:.1f} %")
    ms, share = result["synthetic"]["phase_ms"], result["synthetic"]["phase_share"]
    lines.append("step phases (ms, share): " + ", ".join(f"{k} {ms[k]:.1f} ({100 * share[k]:.0f} %)" for k in ms))
    return "\n".join(lines)
