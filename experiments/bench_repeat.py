"""``excb bench`` several times (each in a fresh process with its own Ray instance): the median and the spread of
its two ratios, Ray Train (1 worker) / plain PyTorch loop and end to end / synthetic step (issue 16, item 4).

    flock /tmp/excb-ray.lock .venv/bin/python experiments/bench_repeat.py --runs 3 --label "Ray defaults"
    flock /tmp/excb-ray.lock .venv/bin/python experiments/bench_repeat.py --runs 3 --label "metrics off" \\
        --env RAY_enable_metrics_collection=0

Every run's JSON goes to experiments/results/bench_repeat/<label>-<i>.json; a table of the runs, the medians and
min–max is appended to experiments/RESULTS.md (with the command and the machine). Runs one after another: on a
2-core machine nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import append_results

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (("ray_over_plain", "Ray Train / plain loop"), ("end_to_end_over_synthetic", "end to end / synthetic"))


def one_run(out: Path, env: dict[str, str], steps: int, warmup: int, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "excb.cli", "bench", "--steps", str(steps), "--warmup", str(warmup),
           "--out", str(out), *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **env})
    return json.loads(out.read_text())


def spread(values: list[float]) -> str:
    return f"{100 * statistics.median(values):.1f} % ({100 * min(values):.1f}–{100 * max(values):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--label", required=True, help="what this setting is, for the table and the file names")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the bench processes (repeatable)")
    ap.add_argument("--results", default=str(ROOT / "experiments" / "RESULTS.md"))
    ap.add_argument("overrides", nargs="*", help="config overrides passed to excb bench")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    folder = ROOT / "experiments" / "results" / "bench_repeat"
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", args.label.lower()).strip("-")
    runs = []
    for i in range(args.runs):
        runs.append(one_run(folder / f"{slug}-{i + 1}.json", env, args.steps, args.warmup, args.overrides))
        r = runs[-1]["ratios"]
        print(f"run {i + 1}: " + ", ".join(f"{name} {100 * r[key]:.1f} %" for key, name in RATIOS), flush=True)
    m = runs[0]["machine"]
    command = shlex.join(["flock", "/tmp/excb-ray.lock", ".venv/bin/python", "experiments/bench_repeat.py",
                          "--runs", str(args.runs), "--steps", str(args.steps), "--warmup", str(args.warmup),
                          "--label", args.label, *(f"--env={kv}" for kv in args.env), *args.overrides])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n### `excb bench` ×{args.runs}: {args.label} — {stamp}\n\n",
             f"`{command}` (machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB, Python {m['python']}, "
             f"torch {m['torch']}, Ray {m['ray']}; nothing else running). Fashion-MNIST recipe, batch 256, "
             f"{args.steps} steps after {args.warmup}; environment {env or 'as is'}.\n\n",
             "| run | synthetic step | plain loop | Ray Train, 1 worker | data wait | Ray / plain | end to end / synthetic |\n",
             "|---|---:|---:|---:|---:|---:|---:|\n"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['synthetic']['images_per_second']:.0f} img/s | {r['plain']['images_per_second']:.0f}"
                     f" img/s | {r['end_to_end']['images_per_second']:.0f} img/s "
                     f"| {100 * r['end_to_end']['data_wait_fraction']:.1f} % "
                     f"| {100 * r['ratios']['ray_over_plain']:.1f} % "
                     f"| {100 * r['ratios']['end_to_end_over_synthetic']:.1f} % |\n")
    lines.append("\nMedian (min–max): " + "; ".join(
        f"{name} {spread([r['ratios'][key] for r in runs])}" for key, name in RATIOS) + ".\n")
    append_results("".join(lines).strip("\n").splitlines(), Path(args.results))
    print("".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
