"""Append a finished sweep's table (trials.csv) and its best config to experiments/RESULTS.md.

    .venv/bin/python experiments/record_sweep.py runs/sweep_fashion_mnist --command "excb sweep --config ..."
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchlib import append_results, machine


def _fmt(value: str) -> str:
    try:
        f = float(value)
    except ValueError:
        return value or "–"
    return f"{f:.4g}" if not f.is_integer() else str(int(f))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sweep_dir")
    ap.add_argument("--command", required=True, help="the command that ran the sweep, as recorded")
    args = ap.parse_args()
    exp = Path(args.sweep_dir)
    summary = json.loads((exp / "sweep.json").read_text())
    with open(exp / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    metric = summary["metric"]
    keys = list(summary["space"])
    rows.sort(key=lambda r: -float(r[f"best_{metric}"] or "-inf"))
    lines = [
        f"### Sweep `{exp.name}` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{args.command}`",
        f"- machine: {machine()}",
        f"- ranked by `{metric}` ({summary['mode']}); {summary['trials']} trials, {summary['errored']} failed; "
        f"experiment directory `{exp}`",
        "",
        "| trial | " + " | ".join(keys) + f" | best {metric} | final {metric} | epochs | wall s | status |",
        "|---|" + "---|" * (len(keys) + 5),
    ]
    for r in rows:
        lines.append(f"| {r['trial_id']} | " + " | ".join(_fmt(r[k]) for k in keys)
                     + f" | {_fmt(r[f'best_{metric}'])} | {_fmt(r[f'final_{metric}'])} | {r['epochs']} | "
                     f"{_fmt(r['wall_seconds'])} | {r['status']} |")
    if "best_config" in summary:
        lines += ["", "Best: " + ", ".join(f"`{k}={_fmt(str(v))}`" for k, v in summary["best_config"].items())
                  + f" ({metric} {summary['best_value']:.2f}); full config in `{exp / 'best_config.yaml'}`."]
    lines.append("")
    append_results(lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
