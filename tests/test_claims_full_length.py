"""The full-length claims grid (experiments/claims_full_length.py) on a tiny budget: cells train through the
project's step, a cell interrupted after an epoch resumes from its saved state to the same result as an
uninterrupted one, finished cells are skipped, and the report aggregates them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "claims_full_length.py"
TINY = ["--epochs", "2", "--train-limit", "256", "--eval-train", "300", "--eval-test", "200"]


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # spawns processes
def test_interrupted_cell_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run("--one", "excb", "16", "0", "--out", str(whole), *TINY)
    _run("--one", "excb", "16", "0", "--out", str(split), *TINY, "--stop-after-epoch", "1")
    cell = split / "excb-b16-s0"
    assert (cell / "state.pt").exists() and not (cell / "result.json").exists()
    assert len(json.loads((cell / "curve.json").read_text())) == 1
    resumed = _run("--one", "excb", "16", "0", "--out", str(split), *TINY)
    assert "resuming after epoch 1" in resumed.stdout
    assert not (cell / "state.pt").exists()  # removed once the result is written
    a = json.loads((whole / "excb-b16-s0" / "result.json").read_text())
    b = json.loads((cell / "result.json").read_text())
    assert a["steps"] == b["steps"] == 2 * (256 // 16) and a["lr"] == 0.3 * 16 / 256
    for key in ("knn_top1", "linear_top1", "nmi", "prototypes_used", "final_loss",
                "estimate_max_cluster_share_x_uniform"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    curve_a = json.loads((whole / "excb-b16-s0" / "curve.json").read_text())
    curve_b = json.loads((cell / "curve.json").read_text())
    assert [c["subset_knn_top1"] for c in curve_a] == pytest.approx([c["subset_knn_top1"] for c in curve_b])


@pytest.mark.slow  # spawns processes
def test_grid_runs_missing_cells_then_reports(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    args = ["--out", str(out), "--methods", "excb", "--batches", "16", "32", "--extra-seeds", "1",
            "--extra-seeds-batch", "16", *TINY]
    first = _run(*args)
    assert "3 cells to do" in first.stdout
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    assert {(r["method"], r["batch"], r["seed"]) for r in rows} == {("excb", 16, 0), ("excb", 32, 0), ("excb", 16, 1)}
    for r in rows:
        assert r["lr"] == pytest.approx(0.3 * r["batch"] / 256)  # the recipe's lr, scaled linearly with the batch
        assert r["epochs"] == 2 and r["images_seen"] == r["steps"] * r["batch"] and r["device"] == "cpu"
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["linear_top1"] <= 100 and 0 < r["prototypes_used"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    cell = next(c for c in summary if c["method"] == "excb" and c["batch"] == 16)
    assert cell["seeds"] == 2
    assert cell["knn_top1"] == pytest.approx(sum(r["knn_top1"] for r in rows
                                                 if r["method"] == "excb" and r["batch"] == 16) / 2)
    table = (out / "table.md").read_text().splitlines()
    two_seeds = next(line for line in table if line.startswith("| ExCB | 16 | 2 |"))
    one_seed = next(line for line in table if line.startswith("| ExCB | 32 | 1 |"))
    assert two_seeds.count("±") == 6 and "±" not in one_seed  # a single seed is shown as its value, not "± 0.00"
    assert (out / "curves.png").stat().st_size > 0
    again = _run(*args)
    assert "0 cells to do" in again.stdout


def test_cells_keep_the_measured_recipe_when_the_default_recipe_changes(tmp_path: Path) -> None:
    """The grid's remaining cells must match the finished ones: a default recipe with another batch, lr, length or
    precision (issue 16) changes nothing in a cell's configuration."""
    import yaml

    sys.path.insert(0, str(SCRIPT.parent))
    from claims_full_length import cell_overrides

    from excb.config import load_config

    recipe = yaml.safe_load((ROOT / "experiments" / "fashion_mnist.yaml").read_text())
    changed = {**recipe, "train": {**recipe["train"], "batch_size": 32, "epochs": 10, "precision": "bf16"},
               "optim": {**recipe["optim"], "lr": 0.0375}}
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    cells = {name: load_config(path, cell_overrides("sinkhorn", 16, 1, None))
             for name, path in (("fashion_mnist", ROOT / "experiments" / "fashion_mnist.yaml"),
                                ("changed", tmp_path / "changed.yaml"))}
    for cfg in cells.values():
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.precision) == (16, 15, "fp32")
        assert cfg.optim.lr == pytest.approx(0.3 * 16 / 256) and cfg.method.balancer == "sinkhorn"
    assert cells["changed"] == cells["fashion_mnist"]


def test_paired_differences_match_a_hand_computed_paired_t_test() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from claims_full_length import paired_differences, paired_table

    def row(method: str, batch: int, seed: int, knn: float, linear: float) -> dict:
        return {"method": method, "batch": batch, "seed": seed, "knn_top1": knn, "linear_top1": linear}

    rows = [row("excb", 16, 0, 88.0, 90.0), row("excb", 16, 1, 89.0, 90.0), row("excb", 16, 2, 88.5, 91.0),
            row("none", 16, 0, 87.5, 90.0), row("none", 16, 1, 88.0, 89.0), row("none", 16, 2, 88.2, 90.5),
            row("none", 16, 3, 10.0, 10.0),  # no ExCB seed 3: left out of the pairs
            row("excb", 256, 0, 87.0, 89.0), row("sinkhorn", 256, 0, 87.5, 89.0)]
    paired = {(e["method"], e["batch"]): e for e in paired_differences(rows)}
    assert set(paired) == {("none", 16), ("sinkhorn", 256)}
    knn = paired[("none", 16)]["knn_top1"]
    assert paired[("none", 16)]["seeds"] == [0, 1, 2]
    assert knn["per_seed"] == pytest.approx([0.5, 1.0, 0.3])
    d = [0.5, 1.0, 0.3]
    mean = sum(d) / 3
    sd = (sum((x - mean) ** 2 for x in d) / 2) ** 0.5
    t = mean / (sd / 3 ** 0.5)
    assert knn["mean"] == pytest.approx(mean) and knn["t"] == pytest.approx(t)
    assert knn["p"] == pytest.approx(1 - t / (t * t + 2) ** 0.5)  # Student's t with 2 degrees of freedom, two-sided
    single = paired[("sinkhorn", 256)]["knn_top1"]
    assert single["per_seed"] == pytest.approx([-0.5]) and "p" not in single  # one seed: no test
    table = paired_table(list(paired.values()))
    assert "| ExCB − no balancing | 16 | 3 | +0.50 +1.00 +0.30 / +0.60 / " in table
    assert "| ExCB − SwAV Sinkhorn | 256 | 1 | -0.50 / -0.50 / – |" in table
