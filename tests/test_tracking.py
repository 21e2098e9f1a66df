"""Experiment tracking (:mod:`excb.run.tracking`): TensorBoard event files in the run dir (local and s3://), resumes
that neither lose nor repeat scalars, W&B offline runs, MLflow file stores, and credentials kept out of every file."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from excb.config import ConfigError, ExcbConfig, load_config
from excb.run.tracking import (
    NULL_TRACKER,
    STATE_FILE,
    TENSORBOARD_DIR,
    Tracker,
    open_trackers,
    worker_env,
)
from excb.rundir.checkpoint import clear_staging, staging_root
from excb.storage import resolve_fs

FAKE_WANDB_KEY = "wandb-fake-api-key-7c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"
FAKE_MLFLOW_TOKEN = "mlflow-fake-token-0f9e8d7c6b5a4f3e2d1c"
FAKE_MLFLOW_PASSWORD = "mlflow-fake-password-5e6f7a8b9c"


def _cfg(*overrides: str) -> ExcbConfig:
    return load_config(None, list(overrides))


def _tb_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in an event-file folder as TensorBoard shows it (purges applied)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _event_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "tfevents" in p.name)


@pytest.fixture()
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B's and the user's folders moved into the test's folder, W&B variables cleared."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME",
                "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture()
def no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow tracking variables; MLFLOW_ALLOW_FILE_STORE unset (and restored to its state afterwards)."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "x")  # recorded, so the delete below is undone after the test
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


# ------------------------------------------------------------------------------------------------ TensorBoard

def test_event_files_in_the_run_dir_hold_the_scalars(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = open_trackers(_cfg(), str(run_dir), resume_step=0)
    assert tracker.names == ["tensorboard"]
    tracker.log_step(10, {"loss": 2.5, "lr": 0.1, "teacher_confidence": 0.25, "changed_by_balancing": 0.125,
                          "images_per_second": 812, "nan": math.nan, "inf": -math.inf, "flag": True,
                          "label": "text", "none": None})
    tracker.log_step(20, {"loss": 2.0, "lr": 0.2})
    tracker.log_epoch(1, 20, {"epoch": 1, "step": 20, "loss": 2.25, "lr": 0.2,
                              "estimate_max_cluster_share_x_uniform": 1.5, "subset_knn_top1": 61.25})
    tb = run_dir / TENSORBOARD_DIR
    assert len(_event_files(tb)) == 1  # the epoch end copied the event file into the run dir
    assert _tb_scalars(tb)["epoch/subset_knn_top1"] == [(20, 61.25)]
    tracker.log_step(30, {"loss": 1.5})
    tracker.close()
    tracker.close()  # idempotent
    tracker.log_step(40, {"loss": 9.0})  # ignored after close

    assert sorted(os.listdir(tb)) == _event_files(tb)  # no temporary upload files left
    scalars = _tb_scalars(tb)
    assert scalars == {
        "train/loss": [(10, 2.5), (20, 2.0), (30, 1.5)],
        "train/lr": [(10, pytest.approx(0.1)), (20, pytest.approx(0.2))],
        "train/teacher_confidence": [(10, 0.25)],
        "train/changed_by_balancing": [(10, 0.125)],
        "train/images_per_second": [(10, 812.0)],
        "epoch/loss": [(20, 2.25)],
        "epoch/lr": [(20, pytest.approx(0.2))],
        "epoch/estimate_max_cluster_share_x_uniform": [(20, 1.5)],
        "epoch/subset_knn_top1": [(20, 61.25)],
        "epoch/epoch": [(20, 1.0)],
    }
    assert not glob.glob(os.path.join(staging_root(str(run_dir)), "track-*"))  # staging removed


def test_staging_lives_in_the_runs_staging_root_and_a_new_attempt_clears_it(tmp_path: Path) -> None:
    """A killed attempt never closes its tracker: its staging folder sits in the run's staging root, which the next
    attempt's clear_staging removes (the rehearsal found such folders left in the temp folder)."""
    run_dir = str(tmp_path / "run")
    code = ("import os, sys; from excb.config import load_config; from excb.run.tracking import open_trackers; "
            "t = open_trackers(load_config(None, []), sys.argv[1], resume_step=0); t.log_step(1, {'loss': 1.0}); "
            "print(os.getpid(), flush=True); os._exit(0)")  # ends without closing, as a killed worker does
    pid = int(subprocess.run([sys.executable, "-c", code, run_dir], capture_output=True, text=True,
                             check=True).stdout)
    left = glob.glob(os.path.join(staging_root(run_dir), f"track-{pid}-tb-*"))
    assert len(left) == 1
    clear_staging(run_dir)  # what the next attempt's rank 0 does first
    assert not os.path.exists(left[0])


def _attempt(run_dir: str, resume_step: int, steps: range, offset: float, epochs: dict[int, int],
             cfg: ExcbConfig | None = None) -> None:
    """One training attempt: ``train/loss = offset + step`` per step, an epoch row at each step in ``epochs``."""
    tracker = open_trackers(cfg or _cfg(), run_dir, resume_step=resume_step)
    for step in steps:
        tracker.log_step(step, {"loss": offset + step})
        if step in epochs:
            tracker.log_epoch(epochs[step], step, {"loss": offset + step + 0.5})
    tracker.close()


def test_resume_keeps_earlier_scalars_and_replaces_the_interrupted_tail(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    # attempt 1: epochs end at steps 4 and 8; it dies at step 10, after the checkpoint at step 4 and before
    # the one at step 8 persisted: attempt 2 resumes from step 4 and redoes steps 5..
    _attempt(run_dir, 0, range(1, 11), 0.0, {4: 1, 8: 2})
    _attempt(run_dir, 4, range(5, 13), 100.0, {8: 2, 12: 3})
    tb = Path(run_dir) / TENSORBOARD_DIR
    assert len(_event_files(tb)) == 2  # one file per attempt, in attempt order (same second: later stamp)
    scalars = _tb_scalars(tb)
    assert scalars["train/loss"] == [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 13)]
    assert scalars["epoch/loss"] == [(4, 4.5), (8, 108.5), (12, 112.5)]
    assert scalars["epoch/epoch"] == [(4, 1.0), (8, 2.0), (12, 3.0)]


def test_an_attempt_without_a_checkpoint_is_replaced_whole(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    _attempt(run_dir, 0, range(1, 4), 0.0, {})
    _attempt(run_dir, 0, range(1, 3), 50.0, {})
    assert _tb_scalars(Path(run_dir) / TENSORBOARD_DIR)["train/loss"] == [(1, 51.0), (2, 52.0)]


def test_event_file_is_copied_within_a_long_epoch(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = open_trackers(_cfg("tracking.upload_every_s=0.05"), str(run_dir), resume_step=0)
    tracker.log_step(1, {"loss": 3.0})
    time.sleep(0.1)
    tracker.log_step(2, {"loss": 2.0})  # past upload_every_s: copied without an epoch end
    assert _tb_scalars(run_dir / TENSORBOARD_DIR)["train/loss"] == [(1, 3.0), (2, 2.0)]
    tracker.close()


def test_tensorboard_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    run_dir = f"{s3_bucket}/runs/r1"
    _attempt(run_dir, 0, range(1, 7), 0.0, {3: 1})
    _attempt(run_dir, 3, range(4, 7), 10.0, {6: 2})
    fs, path = resolve_fs(f"{run_dir}/{TENSORBOARD_DIR}")
    infos = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(Path(i.path).name for i in infos)
    assert len(names) == 2 and all(n.startswith("events.out.tfevents.") for n in names)  # nothing else left
    local = tmp_path / "tb"
    local.mkdir()
    for info in infos:
        with fs.open_input_stream(info.path) as src:
            (local / Path(info.path).name).write_bytes(src.read())
    scalars = _tb_scalars(local)
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    assert scalars["epoch/loss"] == [(3, 3.5), (6, 16.5)]


def test_tracking_off_writes_nothing(tmp_path: Path) -> None:
    tracker = open_trackers(_cfg("tracking.tensorboard=false"), str(tmp_path / "run"), resume_step=0)
    assert tracker.names == []
    tracker.log_step(1, {"loss": 1.0})
    tracker.log_epoch(1, 1, {"loss": 1.0})
    tracker.close()
    assert not (tmp_path / "run").exists()
    NULL_TRACKER.log_step(1, {"loss": 1.0})
    NULL_TRACKER.close()


def test_a_failing_tracker_warns_once_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        name = "broken"
        writes = 0

        def write(self, step: int, tags: dict[str, float]) -> None:
            Broken.writes += 1
            raise OSError("endpoint went away")

        def tick(self) -> None:
            pass

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    tracker = Tracker([Broken()])
    with caplog.at_level(logging.WARNING, logger="excb.run.tracking"):
        for step in range(3):
            tracker.log_step(step, {"loss": 1.0})
        tracker.close()
    assert Broken.writes == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "excb.run.tracking"]
    assert len(warnings) == 1 and "broken log failed" in warnings[0] and "endpoint went away" in warnings[0]


def test_staging_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    old = time.time() - 2 * 3600
    stale = tempfile.mkdtemp(prefix=f"excb-track-{dead_pid}-tb-")
    live = tempfile.mkdtemp(prefix=f"excb-track-{os.getpid()}-tb-")
    for folder in (stale, live):
        Path(folder, "events.out.tfevents.x").write_bytes(b"x")
        os.utime(Path(folder, "events.out.tfevents.x"), (old, old))
        os.utime(folder, (old, old))
    try:
        open_trackers(_cfg(), str(tmp_path / "run"), resume_step=0).close()
        assert not os.path.exists(stale)
        assert os.path.exists(live)  # its process is alive
    finally:
        for folder in (stale, live):
            subprocess.run(["rm", "-rf", folder], check=False)


# ------------------------------------------------------------------------------------------------ W&B

_WANDB_BLOCK = 32 * 1024
_WANDB_HEADER = 7  # ":W&B", magic (2 bytes), version (1 byte)


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (``run-<id>.wandb``): a LevelDB-style log of 32 KiB blocks whose chunks are
    (crc32 4 bytes, length 2 bytes, type 1 byte: full/first/middle/last, data), each a ``Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = _WANDB_HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full or last
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(run_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(run ids, history rows) of every offline run file under RUN/wandb, in the order the attempts ran."""
    ids, rows = [], []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
            elif kind == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    return ids, rows


def test_wandb_offline_run_holds_the_history(tmp_path: Path, wandb_home: Path) -> None:
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    cfg = _cfg("tracking.tensorboard=false", "tracking.wandb=true", "tracking.wandb_mode=offline",
               "tracking.wandb_project=excb-test")
    tracker = open_trackers(cfg, str(run_dir), resume_step=0)
    assert tracker.names == ["wandb"]
    tracker.log_step(5, {"loss": 2.5, "lr": 0.5, "bad": math.nan})
    tracker.log_epoch(1, 10, {"loss": 2.0, "estimate_prototypes_used": 0.75, "subset_knn_top1": 40.0})
    tracker.close()
    run_id = json.loads((run_dir / STATE_FILE).read_text())["wandb_run_id"]

    resumed = open_trackers(cfg, str(run_dir), resume_step=10)  # a later attempt continues the same W&B run
    resumed.log_step(15, {"loss": 1.5})
    resumed.close()

    ids, rows = _wandb_history(run_dir)
    assert ids == [run_id, run_id]
    by_step = {row["_step"]: row for row in rows}
    assert by_step[5]["train/loss"] == 2.5 and by_step[5]["train/lr"] == 0.5 and "train/bad" not in by_step[5]
    assert by_step[10]["epoch/loss"] == 2.0 and by_step[10]["epoch/estimate_prototypes_used"] == 0.75
    assert by_step[10]["epoch/subset_knn_top1"] == 40.0 and by_step[10]["epoch/epoch"] == 1.0
    assert by_step[15]["train/loss"] == 1.5


def test_wandb_offline_run_files_reach_an_s3_run_dir(s3_bucket: str, tmp_path: Path, wandb_home: Path) -> None:
    pytest.importorskip("wandb")
    run_dir = f"{s3_bucket}/runs/r1"
    cfg = _cfg("tracking.tensorboard=false", "tracking.wandb=true", "tracking.wandb_mode=offline")
    with open_trackers(cfg, run_dir, resume_step=0) as tracker:
        tracker.log_step(3, {"loss": 0.75})
        tracker.log_epoch(1, 4, {"loss": 0.5})
    fs, path = resolve_fs(run_dir)
    local = tmp_path / "copy"
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            dest = local / Path(info.path).relative_to(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src:
                dest.write_bytes(src.read())
    ids, rows = _wandb_history(local)
    assert ids == [json.loads((local / STATE_FILE).read_text())["wandb_run_id"]]
    assert {row["_step"]: row.get("train/loss", row.get("epoch/loss")) for row in rows} == {3: 0.75, 4: 0.5}
    assert not glob.glob(os.path.join(staging_root(run_dir), "track-*"))  # staging removed


def test_wandb_online_needs_the_api_key_from_the_environment(tmp_path: Path, wandb_home: Path) -> None:
    pytest.importorskip("wandb")
    cfg = _cfg("tracking.wandb=true", "tracking.wandb_mode=online")
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        open_trackers(cfg, str(tmp_path / "run"), resume_step=0)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ MLflow

def test_mlflow_file_store_holds_the_metrics(tmp_path: Path, no_mlflow_env: None) -> None:
    mlflow = pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    cfg = _cfg("tracking.tensorboard=false", "tracking.mlflow=true", "tracking.mlflow_experiment=excb-test",
               "train.epochs=7")
    tracker = open_trackers(cfg, str(run_dir), resume_step=0)
    assert tracker.names == ["mlflow"]
    tracker.log_step(5, {"loss": 2.5, "lr": 0.5, "bad": math.inf})
    tracker.log_epoch(1, 10, {"loss": 2.0, "estimate_entropy": 0.875, "subset_knn_top1": 40.0})
    tracker.close()
    resumed = open_trackers(cfg, str(run_dir), resume_step=10)
    resumed.log_step(15, {"loss": 1.5})
    resumed.close()

    client = mlflow.tracking.MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("excb-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed attempt continued the same run
    run = runs[0]
    assert run.info.run_id == json.loads((run_dir / STATE_FILE).read_text())["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.epochs"] == "7" and run.data.tags["excb.resumed_from_step"] == "10"

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    assert history("train/loss") == [(5, 2.5), (15, 1.5)]
    assert history("train/lr") == [(5, 0.5)]
    assert history("train/bad") == []
    assert history("epoch/loss") == [(10, 2.0)]
    assert history("epoch/estimate_entropy") == [(10, 0.875)]
    assert history("epoch/subset_knn_top1") == [(10, 40.0)]


def test_mlflow_file_store_needs_a_local_run_dir(no_mlflow_env: None) -> None:
    cfg = _cfg("tracking.tensorboard=false", "tracking.mlflow=true")
    with pytest.raises(ConfigError, match="tracking.mlflow.*local run directory.*MLFLOW_TRACKING_URI"):
        open_trackers(cfg, "s3://no-such-bucket/runs/r1", resume_step=0)


# ------------------------------------------------------------------------------------------------ secrets, config

def test_credentials_from_the_environment_are_written_nowhere(tmp_path: Path, wandb_home: Path, no_mlflow_env: None,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE_MLFLOW_TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "excb-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", FAKE_MLFLOW_PASSWORD)
    run_dir = tmp_path / "run"
    cfg = _cfg("tracking.wandb=true", "tracking.wandb_mode=offline", "tracking.mlflow=true")
    with caplog.at_level(logging.DEBUG):
        for resume_step in (0, 4):
            with open_trackers(cfg, str(run_dir), resume_step=resume_step) as tracker:
                assert tracker.names == ["tensorboard", "mlflow", "wandb"]
                tracker.log_step(resume_step + 2, {"loss": 1.0})
                tracker.log_epoch(1, resume_step + 4, {"loss": 0.5})
    assert worker_env(cfg)["WANDB_API_KEY"] == FAKE_WANDB_KEY  # what Ray's runtime_env would forward
    assert "WANDB_API_KEY" not in worker_env(_cfg())

    secrets = [s.encode() for s in (FAKE_WANDB_KEY, FAKE_MLFLOW_TOKEN, FAKE_MLFLOW_PASSWORD)]
    scanned = 0
    for path in tmp_path.rglob("*"):  # run dir (event files, W&B offline run, MLflow store) and W&B's home folders
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            scanned += 1
            assert not any(s in data for s in secrets), f"a credential was written into {path}"
    assert scanned >= 5 and list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    out, err = capfd.readouterr()
    text = out + err + "\n".join(r.getMessage() for r in caplog.records)
    assert not any(s.decode() in text for s in secrets)


def test_missing_libraries_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"tracking\.wandb.*pip install 'excb\[wandb\]'"):
        open_trackers(_cfg("tracking.wandb=true", "tracking.wandb_mode=offline"), str(tmp_path), resume_step=0)
    with pytest.raises(ConfigError, match=r"tracking\.mlflow.*pip install 'excb\[mlflow\]'"):
        open_trackers(_cfg("tracking.mlflow=true"), str(tmp_path), resume_step=0)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"tracking\.tensorboard.*pip install 'tensorboard"):
        open_trackers(_cfg(), str(tmp_path), resume_step=0)
    assert not list(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize(("override", "key"), [
    ("tracking.wandb_mode=cloud", "tracking.wandb_mode"),
    ("tracking.upload_every_s=0", "tracking.upload_every_s"),
    ("tracking.upload_every_s=-5", "tracking.upload_every_s"),
    ("tracking.wandb_project=team/excb", "tracking.wandb_project"),
    ("tracking.wandb_project=", "tracking.wandb_project"),
    ("tracking.mlflow_experiment=' '", "tracking.mlflow_experiment"),
    ("tracking.mlflow_tracking_uri=https://alice:hunter22@mlflow.example.com", "tracking.mlflow_tracking_uri"),
    ("tracking.wandb=yes please", "tracking.wandb"),
    ("tracking.wandb_api_key=abc", "tracking.wandb_api_key"),
])
def test_bad_tracking_values_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(None, [override])
    assert "hunter22" not in str(info.value)


def test_tracking_defaults_and_overrides() -> None:
    tr = _cfg().tracking
    assert (tr.tensorboard, tr.wandb, tr.mlflow, tr.wandb_mode) == (True, False, False, "online")
    tr = _cfg("tracking.wandb=true", "tracking.wandb_mode=offline", "tracking.wandb_entity=lab",
              "tracking.mlflow=true", "tracking.mlflow_tracking_uri=http://127.0.0.1:5000").tracking
    assert (tr.wandb, tr.wandb_mode, tr.wandb_entity, tr.mlflow) == (True, "offline", "lab", True)
    assert tr.mlflow_tracking_uri == "http://127.0.0.1:5000"
