"""Benchmark: training throughput with 1 and 2 Ray Train workers on this machine, and the share of step time each
worker spends waiting for data; appends an entry to experiments/RESULTS.md.

Each setting runs ``excb pretrain`` (its own Ray instance) for ``--epochs`` epochs on the first ``--rows`` training
images of the default config, with the same global batch, and reads the last epoch (steady state) from
metrics.jsonl. The machine's cores are shared out: ``W`` workers get ``cores / W`` torch threads each.

    .venv/bin/python experiments/bench_workers.py [--workers 1 2] [--epochs 2] [--rows 30000] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchlib import ROOT, append_results, machine


def run_setting(workers: int, args: argparse.Namespace, name: str) -> dict[str, float]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    cmd = [str(Path(sys.executable).with_name("excb")), "pretrain", "--config", args.config,
           "--storage-path", args.storage_path, "--name", name,
           f"train.num_workers={workers}", f"train.torch_threads={threads}",
           f"train.cpus_per_worker={1.0 / workers}", f"train.epochs={args.epochs}", f"data.limit={args.rows}",
           "eval.final_eval=false", "eval.epoch_knn_train=0", "train.log_every_steps=0", *args.overrides]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    lines = (Path(args.storage_path) / name / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    return {"workers": workers, "threads": threads, "global_batch": last["global_batch"],
            "images_per_second": last["images_per_second"], "data_wait_fraction": last["data_wait_fraction"],
            "epoch_seconds": last["epoch_seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="experiments/fashion_mnist.yaml")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=30000)
    ap.add_argument("--storage-path", default=str(ROOT / "runs"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    rows = [run_setting(w, args, f"bench-workers{w}-{stamp}") for w in args.workers]
    base = rows[0]["images_per_second"] / rows[0]["workers"]
    argv = shlex.join(sys.argv[1:])
    entry = [
        f"### Throughput across Ray Train workers — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `.venv/bin/python experiments/bench_workers.py{' ' + argv if argv else ''}`",
        f"- machine: {machine()}",
        f"- workload: `{args.config}`, first {args.rows} training images, last of {args.epochs} epochs (steady "
        "state), same global batch for every worker count, cores split evenly between workers",
        "",
        "| workers | torch threads each | global batch | images/s | per-worker images/s vs 1 worker | "
        "data wait (share of step time) |",
        "|---|---|---|---|---|---|",
        *[f"| {r['workers']} | {r['threads']} | {r['global_batch']} | {r['images_per_second']:.0f} | "
          f"{r['images_per_second'] / r['workers'] / base:.2f} | {100 * r['data_wait_fraction']:.1f} % |"
          for r in rows],
        "",
    ]
    append_results(entry)
    print("\n".join(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
