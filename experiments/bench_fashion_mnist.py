"""Benchmark: the default Fashion-MNIST pretraining, timed end to end, checked against the targets, and recorded.

Runs ``excb pretrain`` as a user would (a fresh run name, Ray started by the command), measures wall time from
the command's start to its end, reads the run's summary.json and appends a dated entry to
experiments/RESULTS.md with the command, the machine and the numbers.

    .venv/bin/python experiments/bench_fashion_mnist.py [--config experiments/fashion_mnist.yaml] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchlib import ROOT, append_results, machine

TARGETS = {"knn_top1": 87.0, "prototypes_used": 0.90, "max_cluster_share_x_uniform": 5.0, "wall_minutes": 30.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="experiments/fashion_mnist.yaml")
    ap.add_argument("--storage-path", default="runs")
    ap.add_argument("--name", default=None, help="run name (default: bench-<timestamp>, always a fresh run)")
    ap.add_argument("--results", default=str(ROOT / "experiments" / "RESULTS.md"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    name = args.name or "bench-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    excb = str(Path(sys.executable).with_name("excb"))
    cmd = [excb, "pretrain", "--config", args.config, "--storage-path", args.storage_path, "--name", name,
           *args.overrides]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - t0
    run_dir = Path(args.storage_path) if Path(args.storage_path).is_absolute() else ROOT / args.storage_path
    summary = json.loads((run_dir / name / "summary.json").read_text())
    checks = {
        "knn_top1": summary["knn_top1"] >= TARGETS["knn_top1"],
        "prototypes_used": summary["prototypes_used"] >= TARGETS["prototypes_used"],
        "max_cluster_share_x_uniform": summary["max_cluster_share_x_uniform"] <= TARGETS["max_cluster_share_x_uniform"],
        "wall_minutes": wall / 60 <= TARGETS["wall_minutes"],
    }
    shown = shlex.join(["excb", "pretrain", "--config", args.config, *args.overrides])
    entry = [
        f"### Fashion-MNIST default pretraining — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{shlex.join(['.venv/bin/python', 'experiments/bench_fashion_mnist.py', *args.overrides])}` "
        f"(runs `{shown}`)",
        f"- machine: {machine()}",
        f"- run directory: `{run_dir / name}`",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
        f"| kNN top-1 (k=20, T=0.07, 60k train → 10k test) | {summary['knn_top1']:.2f} % | ≥ 87 % | "
        f"{'yes' if checks['knn_top1'] else 'NO'} |",
        f"| linear probe top-1 (frozen features, L-BFGS) | "
        f"{summary['linear_top1']:.2f} % | | |" if "linear_top1" in summary else "| linear probe top-1 | not run | | |",
        f"| wall time of the whole command | {wall / 60:.1f} min | ≤ 30 min | {'yes' if checks['wall_minutes'] else 'NO'} |",
        f"| prototypes used (teacher argmax over the train split) | {100 * summary['prototypes_used']:.1f} % | ≥ 90 % | "
        f"{'yes' if checks['prototypes_used'] else 'NO'} |",
        f"| largest cluster (train split) | {summary['max_cluster_share_x_uniform']:.2f} × uniform | ≤ 5 × | "
        f"{'yes' if checks['max_cluster_share_x_uniform'] else 'NO'} |",
        f"| normalised entropy of assignments / of the size estimate | {summary['normalized_entropy']:.3f} / "
        f"{summary['estimate_normalized_entropy']:.3f} | | |",
        f"| NMI (test assignments vs labels) | {summary['nmi']:.3f} | | |",
        f"| training throughput | {summary['images_per_second']:.0f} images/s | | |",
        f"| epochs, train time, evaluation included in wall time | {summary['epochs']}, "
        f"{summary['train_seconds'] / 60:.1f} min | | |",
        "",
    ]
    append_results(entry, Path(args.results))
    print("\n".join(entry))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
