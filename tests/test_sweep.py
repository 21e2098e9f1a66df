"""Sweeps with Ray Tune (excb.run.sweep): spec checks, a sweep with ASHA, a failing trial, resume."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
import yaml
from testkit.configs import TINY

from excb.cli import main as cli_main
from excb.config import ConfigError, load_config
from excb.evaluation.report import plot_sweep
from excb.run.sweep import load_sweep, param_space, run_sweep, trial_overrides
from excb.rundir.runfiles import read_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(fm_shards: Callable[..., str]) -> str:
    return fm_shards(320, rows_per_shard=160)


def _write_sweep(tmp_path: Path, shards: str, space: dict, **extra) -> Path:
    spec = {"base": None, "overrides": [*TINY, f"data.path={shards}", "train.epochs=2", "train.cpus_per_worker=0.5",
                                        "eval.final_eval=false"],
            "space": space, "asha": {"grace_period": 1, "reduction_factor": 2}, "max_concurrent_trials": 2,
            "trial_resources": {"CPU": 0.1}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(experiment: str) -> list[dict[str, str]]:
    with open(Path(experiment) / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_shipped_sweep_loads_and_bad_specs_are_refused(tmp_path: Path) -> None:
    spec = load_sweep(ROOT / "experiments" / "sweep_fashion_mnist.yaml")
    assert set(spec.space) == {"model.num_prototypes", "method.teacher_temp", "method.student_temp",
                               "method.balance_momentum"}
    space = param_space(spec)
    assert space["model.num_prototypes"] == {"grid_search": [128, 256, 512, 1024]}
    assert 0.02 <= space["method.teacher_temp"].sample() <= 0.07
    assert trial_overrides({"model.num_prototypes": 64, "method.teacher_temp": 0.05}) == [
        "method.teacher_temp=0.05", "model.num_prototypes=64"]
    for bad, match in (({"space": {"model.nope": {"grid": [1]}}}, "model.nope"),
                       ({"space": {"method.teacher_temp": {"between": [1, 2]}}}, "method.teacher_temp"),
                       ({"space": {"method.teacher_temp": {"loguniform": [0, 1]}}}, "loguniform"),
                       ({"mode": "best"}, "mode"), ({"typo": 1}, "typo"),
                       ({"overrides": ["train.checkpoint_every_steps=100"]}, "checkpoint_every_steps"),
                       ({"space": {"train.checkpoint_every_minutes": {"grid": [5.0]}}}, "checkpoint_every_minutes")):
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({"base": None, **bad}))
        with pytest.raises(ConfigError, match=match):
            load_sweep(p)


@pytest.mark.ray
def test_sweep_table_best_config_tensorboard_plots(ray_session: None, shards: str, tmp_path: Path) -> None:
    """A grid axis and a sampled axis, two trials at once under ASHA (two trials, not more: each costs a Train
    run's start-up, and two run side by side on 2 CPUs)."""
    path = _write_sweep(tmp_path, shards, {"model.num_prototypes": {"grid": [8, 16]},
                                           "method.teacher_temp": {"loguniform": [0.03, 0.06]}})
    summary = run_sweep(load_sweep(path), storage_path=str(tmp_path), name="sw")
    rows = _rows(summary["experiment"])
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    assert sorted(int(r["model.num_prototypes"]) for r in rows) == [8, 16]
    assert len({r["method.teacher_temp"] for r in rows}) == 2  # sampled per trial
    assert all(1 <= int(r["epochs"]) <= 2 and float(r["best_subset_knn_top1"]) > 0 for r in rows)
    assert any(int(r["epochs"]) == 2 for r in rows)
    best = max(rows, key=lambda r: float(r["best_subset_knn_top1"]))
    assert summary["best_trial"] == best["trial_id"]
    cfg = load_config(Path(summary["experiment"]) / "best_config.yaml")  # ready to use
    assert cfg.model.num_prototypes == int(best["model.num_prototypes"])
    assert cfg.method.teacher_temp == pytest.approx(float(best["method.teacher_temp"]))
    exp = Path(summary["experiment"])
    for r in rows:  # every trial: its Train run, Tune's CSV/JSON results and TensorBoard events
        assert len(read_metrics(str(exp / "runs" / r["trial_id"]))) == int(r["epochs"])
    trial_dirs = [d for d in exp.iterdir() if d.is_dir() and (d / "result.json").exists()]
    assert len(trial_dirs) == 2
    assert all((d / "progress.csv").exists() and list(d.glob("events.out.tfevents*")) for d in trial_dirs)
    plots = plot_sweep(str(exp))
    assert {Path(p).name for p in plots} == {"metric_vs_model.num_prototypes.png",
                                             "metric_vs_method.teacher_temp.png", "learning_curves.png"}
    assert all(Path(p).stat().st_size > 1000 for p in plots)
    assert cli_main(["report", str(exp), "--out", str(tmp_path / "again")]) == 0  # `excb report SWEEP_DIR`
    assert len(list((tmp_path / "again").glob("*.png"))) == 3


@pytest.mark.ray
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session: None, shards: str,
                                                                      tmp_path: Path) -> None:
    path = _write_sweep(tmp_path, shards, {"model.num_prototypes": {"grid": [8]}}, asha=None,
                        max_concurrent_trials=1, num_samples=2)  # num_samples repeats the grid: two trials
    cmd = [str(Path(sys.executable).with_name("excb")), "sweep", "--config", str(path), "--storage-path",
           str(tmp_path), "--name", "resume"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    runs = tmp_path / "resume" / "runs"

    def finished() -> list[Path]:
        return [d for d in runs.glob("*") if (d / "metrics.jsonl").exists() and len(read_metrics(str(d))) == 2]

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while first.poll() is None and not finished():
            time.sleep(0.2)
        time.sleep(3)  # let Tune record the finished trial in its experiment state
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = finished()
    assert done and not (tmp_path / "resume" / "trials.csv").exists()  # interrupted before the end
    before = {d.name: ((d / "metrics.jsonl").read_text(), (d / "metrics.jsonl").stat().st_mtime_ns) for d in done}
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming sweep" in second.stdout
    rows = _rows(str(tmp_path / "resume"))
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["epochs"] == "2" for r in rows)
    for name, (text, mtime) in before.items():  # finished trials were not trained again
        assert (runs / name / "metrics.jsonl").read_text() == text
        assert (runs / name / "metrics.jsonl").stat().st_mtime_ns == mtime


@pytest.mark.ray
def test_failing_trial_is_reported_while_others_complete_and_mlflow_logs_both(
        ray_session: None, shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One sweep for two behaviours (each sweep costs a Tune experiment's start-up): a trial whose config is
    refused errors and is reported while the other completes, and the MLflow callback logs every trial."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store keeps the test free of a database
    uri = (tmp_path / "mlruns").as_uri()
    path = _write_sweep(tmp_path, shards, {"method.teacher_temp": {"grid": [0.04, -1.0]}}, asha=None,
                        mlflow={"tracking_uri": uri, "experiment": "excb-test"})
    summary = run_sweep(load_sweep(path), storage_path=str(tmp_path), name="bad")
    rows = {float(r["method.teacher_temp"]): r for r in _rows(summary["experiment"])}
    assert rows[0.04]["status"] == "TERMINATED" and int(rows[0.04]["epochs"]) == 2
    assert rows[-1.0]["status"] == "ERROR" and "method.teacher_temp" in rows[-1.0]["error"]
    assert summary["errored"] == 1 and summary["best_config"] == {"method.teacher_temp": 0.04}

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("excb-test")
    runs = {float(r.data.params["method.teacher_temp"]): r for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == summary["trials"] == 2
    assert "subset_knn_top1" in runs[0.04].data.metrics
    assert runs[0.04].info.status == "FINISHED" and runs[-1.0].info.status == "FAILED"
