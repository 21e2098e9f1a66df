"""Memory of the evaluation at two dataset sizes (issue 13, item 5): the same checkpoint evaluated through
``excb evaluate --engine ray`` (Ray Data feature extraction to Parquet, block-wise kNN over Ray tasks, the
streaming linear probe) on Fashion-MNIST's 60,000 training images and on 240,000 (each image four times: as is,
mirrored, shifted by 2 px, mirrored and shifted; PNG-encoded; ids made unique), both against the 10,000 test images.

    flock /tmp/excb-ray.lock .venv/bin/python experiments/eval_memory.py

Records, per size: wall time, peak resident memory (psutil RSS, sampled every 0.2 s) of the driver (this process)
and of each Ray worker process (the feature actors and the kNN tasks run in them), kNN and linear top-1. The
checkpoint is the untrained network of ``experiments/fashion_mnist.yaml`` (``--run`` evaluates a trained run
instead): memory does not depend on the weights. Results: a section of experiments/RESULTS.md and
experiments/results/eval_memory.json. Only one Ray instance may run on this machine at a time: keep the flock.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchlib import append_results  # noqa: E402

MIB = 2**20


def build_datasets(work: Path) -> tuple[str, str]:
    """60k and 240k-image shard sets (same 10k test split); reused when present."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from excb.data import prepare_fashion_mnist
    from excb.data.shards import list_shards, shards_exist, write_meta, write_split

    small, big = work / "fm60k", work / "fm240k"
    if not shards_exist(str(small)):
        prepare_fashion_mnist(str(small))
    if shards_exist(str(big)):
        return str(small), str(big)

    def variants() -> Any:
        for shard in list_shards(str(small), "train"):
            table = pq.read_table(shard)
            for row_id, data, label in zip(table["id"].to_pylist(), table["image"].to_pylist(),
                                           table["label"].to_pylist(), strict=True):
                img = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
                shifted = np.roll(img, 2, axis=1)
                for k, arr in enumerate((img, img[:, ::-1], shifted, shifted[:, ::-1])):
                    buf = io.BytesIO()
                    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
                    yield f"{row_id}-v{k}", buf.getvalue(), int(label)

    def test_rows() -> Any:
        for shard in list_shards(str(small), "test"):
            table = pq.read_table(shard)
            yield from zip(table["id"].to_pylist(), table["image"].to_pylist(), table["label"].to_pylist(),
                           strict=True)

    rows = write_split(variants(), str(big), "train")
    test = write_split(test_rows(), str(big), "test")
    meta = json.loads((small / "meta.json").read_text())
    meta.update(train_rows=rows, test_rows=test, note="4 variants of each Fashion-MNIST training image")
    write_meta(str(big), meta)
    return str(small), str(big)


def untrained_run(run_dir: Path, overrides: list[str]) -> None:
    from excb.config import load_config
    from excb.method.learner import ExcbLearner
    from excb.run.worker import training_state
    from excb.rundir.checkpoint import (
        checkpoint_dir_name,
        list_checkpoints,
        write_state_dir,
    )

    if list_checkpoints(str(run_dir)):
        return
    cfg = load_config(ROOT / "experiments" / "fashion_mnist.yaml", overrides)
    learner = ExcbLearner(cfg, steps_per_epoch=1)
    write_state_dir(training_state(learner, 1, [], cfg), str(run_dir / checkpoint_dir_name(1)))


def rss_parts(pid: int) -> dict[str, int]:
    """Resident memory of a process (bytes) from /proc/PID/status: ``rss`` in all, ``anon`` its private
    (anonymous) pages, ``shared`` the file and shared-memory pages it maps (Ray's object store is shared memory)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields.get("VmRSS", 0), "anon": fields.get("RssAnon", 0),
            "shared": fields.get("RssFile", 0) + fields.get("RssShmem", 0)}


class Sampler:
    """Peak RSS of this process and of every process below it (Ray's), by pid, every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.psutil, self.me, self.interval = psutil, psutil.Process(), interval
        self.peaks: dict[int, dict[str, Any]] = {}
        self.driver = self.driver_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        ps = self.psutil
        try:
            mine = rss_parts(self.me.pid)
        except OSError:
            return
        self.driver, self.driver_anon = max(self.driver, mine["rss"]), max(self.driver_anon, mine["anon"])
        # every Ray process on the machine (only one Ray instance runs here), not only this process's descendants:
        # children() missed the feature actors in a first run
        for p in ps.process_iter():
            if p.pid == self.me.pid:
                continue
            try:
                name = " ".join(p.cmdline())[:80]
                if not (name.startswith("ray::") or "default_worker" in name):
                    continue
                parts = rss_parts(p.pid)
                entry = self.peaks.setdefault(p.pid, {"names": set(), "peak": 0, "anon": 0, "shared": 0})
                entry["names"].add(name.split()[0])
                entry["peak"] = max(entry["peak"], parts["rss"])
                entry["anon"] = max(entry["anon"], parts["anon"])
                entry["shared"] = max(entry["shared"], parts["shared"])
            except (ps.Error, OSError):
                continue

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def workers(self, key: str = "peak", task: str | None = None) -> list[int]:
        """Peaks (``peak`` RSS, ``anon`` private, ``shared``) of Ray's worker processes (where actors and tasks
        run), largest first; only those that ran ``task`` (``ray::<task>`` seen in their title) when given."""
        return sorted((e[key] for e in self.peaks.values() if task is None or f"ray::{task}" in e["names"]),
                      reverse=True)


def measure(run: Path, label: str, data: str) -> dict[str, Any]:
    """Evaluate ``run`` on ``data`` with the Ray engine while sampling memory; one row of the table."""
    from excb.evaluation.evaluate import evaluate_run

    t0 = time.time()
    with Sampler() as s:
        result = evaluate_run(str(run), data_path=data, engine="ray")
    knn_rss, knn_anon = s.workers(task="knn_chunk"), s.workers("anon", task="knn_chunk")
    return {"dataset": label, "data": data, "train_rows": result["eval_train_rows"],
            "test_rows": result["eval_test_rows"], "seconds": time.time() - t0,
            "driver_peak_mib": s.driver / MIB, "driver_private_peak_mib": s.driver_anon / MIB,
            "worker_peak_mib": [w / MIB for w in s.workers()],
            "worker_private_peak_mib": [w / MIB for w in s.workers("anon")],
            "worker_shared_peak_mib": [w / MIB for w in s.workers("shared")],
            "knn_worker_peak_mib": [w / MIB for w in knn_rss],
            "knn_worker_private_peak_mib": [w / MIB for w in knn_anon],
            "knn_task_peak_rss_mib": result.get("knn_task_peak_rss_mb"),
            "knn_task_growth_mib": result.get("knn_task_growth_mb"),
            "knn_top1": result.get("knn_top1"), "linear_top1": result.get("linear_top1"),
            "linear_fit": result.get("linear_fit")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/excb-evalmem")
    p.add_argument("--run", default=None, help="a trained run to evaluate (default: an untrained checkpoint)")
    p.add_argument("--results", default=str(ROOT / "experiments" / "RESULTS.md"))
    p.add_argument("--json", default=str(ROOT / "experiments" / "results" / "eval_memory.json"))
    p.add_argument("--one", choices=["60k", "240k"], help=argparse.SUPPRESS)  # internal: one size, this process
    p.add_argument("overrides", nargs="*", help="config overrides of the untrained checkpoint")
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    from excb.run.startup import init_ray

    t = time.time()
    small, big = build_datasets(work)
    print(f"datasets ready in {time.time() - t:.0f} s: {small}, {big}", flush=True)
    run = Path(args.run) if args.run else work / "run"
    # eval.linear_in_memory_mb=0: the streaming probe, so no step loads a whole split's features
    untrained_run(run, ["eval.linear_in_memory_mb=0", "eval.feature_workers=2", "train.cpus_per_worker=1",
                        *args.overrides])
    if args.one:  # a child: one size, in a fresh process with its own Ray instance
        import ray

        data = {"60k": small, "240k": big}[args.one]
        init_ray(num_cpus=2)
        shutil.rmtree(run / "features", ignore_errors=True)
        print("ROW " + json.dumps(measure(run, args.one, data)), flush=True)
        ray.shutdown()
        return 0
    rows = []
    for label in ("60k", "240k"):
        # each size in its own process, so neither starts from what the other left in the driver's heap
        cmd = [sys.executable, __file__, "--one", label, "--work-dir", str(work),
               *(["--run", args.run] if args.run else []), *args.overrides]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW "))))
        print(json.dumps(rows[-1]), flush=True)

    import ray
    import torch

    machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python " \
              f"{platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}"
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json + ".tmp"
    Path(tmp).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    os.replace(tmp, args.json)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n### Evaluation memory at two dataset sizes (issue 13) — {stamp}\n",
             "\n`flock /tmp/excb-ray.lock .venv/bin/python experiments/eval_memory.py` "
             f"(machine: {machine}). The same checkpoint ({'run ' + str(args.run) if args.run else 'untrained'}) "
             "evaluated with `engine=ray`, each size in a fresh driver process with its own Ray instance: features by 2 Ray Data actors into Parquet, kNN (k=20, T=0.07) over Ray "
             "tasks in blocks of `eval.knn_block_rows` train rows (in worker processes of their own), the "
             "streaming linear probe. Memory from /proc/PID/status every 0.2 s: RSS, and its private part (RssAnon; "
             "the rest is the object store's shared memory and mapped files, counted once per process that "
             "maps them).\n\n",
             "| train rows | test rows | wall | driver peak RSS (private) | largest Ray worker peak RSS (private) "
             "| kNN worker peak RSS (private) | kNN task growth | kNN top-1 | linear top-1 |\n",
             "|---|---|---|---|---|---|---|---|---|\n"]
    top = lambda r, k: max(r[k]) if r[k] else float("nan")  # noqa: E731
    for r in rows:
        lines.append(f"| {r['train_rows']:,} | {r['test_rows']:,} | {r['seconds']:.0f} s "
                     f"| {r['driver_peak_mib']:.0f} MiB ({r['driver_private_peak_mib']:.0f} MiB) "
                     f"| {top(r, 'worker_peak_mib'):.0f} MiB ({top(r, 'worker_private_peak_mib'):.0f} MiB) "
                     f"| {top(r, 'knn_worker_peak_mib'):.0f} MiB ({top(r, 'knn_worker_private_peak_mib'):.0f} MiB) "
                     f"| {r['knn_task_growth_mib']:.0f} MiB | {r['knn_top1']:.2f} % | {r['linear_top1']:.2f} % |\n")
    a, b = rows
    growth = lambda k: b[k] / a[k] if a[k] else float("nan")  # noqa: E731
    ratio = lambda k: top(b, k) / top(a, k)  # noqa: E731
    lines.append(f"\n4× the training rows: driver peak ×{growth('driver_peak_mib'):.2f} (private "
                 f"×{growth('driver_private_peak_mib'):.2f}), largest worker peak "
                 f"×{ratio('worker_peak_mib'):.2f} (private ×{ratio('worker_private_peak_mib'):.2f}), kNN worker "
                 f"peak ×{ratio('knn_worker_peak_mib'):.2f} (private ×{ratio('knn_worker_private_peak_mib'):.2f}; "
                 f"its growth inside the task ×{growth('knn_task_growth_mib'):.2f}), "
                 f"wall time ×{growth('seconds'):.2f}.\n")
    append_results("".join(lines).strip("\n").splitlines(), Path(args.results))
    print("".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
