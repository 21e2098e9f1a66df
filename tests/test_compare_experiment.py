"""The claims experiment's command (experiments/compare_balancers.py) end to end on a tiny budget: every
(method, batch, seed) cell trains through the project's step, is evaluated, and the report aggregates them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns processes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "compare_balancers.py"


def test_tiny_comparison_writes_runs_table_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--methods", "excb", "sinkhorn", "--batches", "16",
           "--seeds", "0", "1", "--images", "192", "--epochs", "2", "--eval-train", "600", "--eval-test", "300",
           "--jobs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    assert {(r["method"], r["batch"], r["seed"]) for r in rows} == {
        (m, 16, s) for m in ("excb", "sinkhorn") for s in (0, 1)}
    for r in rows:
        assert r["images_seen"] == (192 // (2 * r["batch"])) * 2 * r["batch"]  # equal images per pseudo-epoch split
        assert r["lr"] == 0.3 * r["batch"] / 256  # linear lr scaling from the recipe's batch 256
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["linear_top1"] <= 100
        assert 0 < r["prototypes_used"] <= 1 and 0 <= r["normalized_entropy"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 2 and all(c["seeds"] == 2 for c in summary)
    cell = next(c for c in summary if c["method"] == "excb" and c["batch"] == 16)
    knns = [r["knn_top1"] for r in rows if r["method"] == "excb" and r["batch"] == 16]
    assert abs(cell["knn_top1"] - sum(knns) / 2) < 1e-9
    table = (out / "table.md").read_text()
    assert "| ExCB | 16 | 2 |" in table and "| SwAV Sinkhorn | 16 | 2 |" in table
    assert (out / "accuracy_vs_batch.png").stat().st_size > 0 and (out / "cluster_shares.png").stat().st_size > 0

    # a relaunch finds every run done and only redraws the report
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "0 runs to do" in again.stdout
