"""Scale-out through Ray's real machinery on one machine: 2 data-parallel workers, a worker killed with SIGKILL in
the middle of an epoch, and a driver killed and relaunched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
from testkit.configs import TINY
from testkit.processes import train_worker_pids

from excb.config import dump_yaml, load_config
from excb.run.pretrain import run_pretraining
from excb.rundir.checkpoint import list_checkpoints, read_state_dir, staging_root
from excb.rundir.runfiles import SAMPLE_IDS_DIR, read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROWS = 2000  # shards of 700, 700 and 600 rows: uneven on purpose
BATCH = 64
STEPS = ROWS // BATCH  # 31 steps per epoch for any number of workers that divides the batch


@pytest.fixture(scope="module")
def shards(fm_shards: Callable[..., str]) -> str:
    return fm_shards(ROWS, rows_per_shard=700)


def _cfg(shards: str, *extra: str):
    return load_config(None, [*TINY, f"data.path={shards}", "train.cpus_per_worker=0.5",
                              "eval.final_eval=false", *extra])


def _wait_for_epochs(run_dir: Path, n: int, alive: Any) -> list[dict[str, Any]]:
    """Poll metrics.jsonl until it holds ``n`` epochs (the run keeps going meanwhile)."""
    while alive():
        if (run_dir / "metrics.jsonl").exists():
            history = read_metrics(str(run_dir))
            if len(history) >= n:
                return history
        time.sleep(0.1)
    raise AssertionError(f"the run ended before epoch {n} was reported")


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def test_two_workers_follow_one_worker(ray_session: None, shards: str, tmp_path: Path) -> None:
    """Global batch 64 as 1×64 and as 2×32 through Ray Train, same data and seed: the same step count, batch and
    lr schedule, and the same loss curve within 15 % per epoch. Through Ray the runs are not bitwise reproducible
    (Ray Data draws a fresh block order each pass, and the two set-ups draw different random views), and on this
    tiny model the loss wanders: the same 1-worker config measured 2.31-2.56 at epoch 2 across runs, a spread of
    8 %. The exact statement — identical views and data give the same losses to 3e-5 and the same weights — is
    tested without Ray in test_data_parallel.py."""
    one = run_pretraining(_cfg(shards, "train.epochs=2"), str(tmp_path), "one")
    two = run_pretraining(_cfg(shards, "train.epochs=2", "train.num_workers=2"), str(tmp_path), "two")
    h1, h2 = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert [r["workers"] for r in h1] == [1, 1] and [r["workers"] for r in h2] == [2, 2]
    assert [r["global_batch"] for r in h2] == [BATCH] * 2
    assert [r["step"] for r in h1] == [r["step"] for r in h2] == [STEPS, 2 * STEPS]
    for a, b in zip(h1, h2):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 0.15, (a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"])
    assert one["optimizer_steps"] == two["optimizer_steps"] == 2 * STEPS
    # the size estimate is all-reduced: every rank checkpoints the same one, and it moved away from uniform. Its sum
    # is 1 up to float32 rounding of 62 EMA updates of 16 entries (CI measured 1 + 1.07e-6 once).
    state = read_state_dir(list_checkpoints(str(tmp_path / "two"))[-1])
    assert state["balancer"]["sizes"].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert h2[-1]["estimate_max_cluster_share_x_uniform"] > 1.0


def test_worker_killed_mid_epoch_resumes_from_last_checkpoint(ray_session: None, shards: str, tmp_path: Path) -> None:
    cfg = _cfg(shards, "train.epochs=3", "train.max_failures=2", "train.record_sample_ids=true")
    thread, result = _in_thread(lambda: run_pretraining(cfg, str(tmp_path), "k"))
    run_dir = tmp_path / "k"
    before = _wait_for_epochs(run_dir, 1, thread.is_alive)
    time.sleep(before[0]["epoch_seconds"] / 2)  # into the middle of epoch 2
    victims = train_worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[0], signal.SIGKILL)
    thread.join()
    assert "error" not in result, result.get("error")
    assert victims[0] not in train_worker_pids()

    history = read_metrics(str(run_dir))
    assert [r["epoch"] for r in history] == [1, 2, 3]  # no epoch skipped, none twice
    assert history[0] == before[0]  # epoch 1 came from the checkpoint, not from training it again
    state = read_state_dir(list_checkpoints(str(run_dir))[-1])
    assert state["step"] == result["value"]["optimizer_steps"] == 3 * STEPS  # as many steps as without the kill
    _check_each_pass_is_complete(run_dir, epochs=3)
    staging = Path(staging_root(str(run_dir)))  # every staged checkpoint removed, across the kill and the resume
    assert not staging.exists() or list(staging.iterdir()) == []


def _passes(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """The ids each rank consumed in each epoch, as the final state trained on them: the audit files are stretches
    ``[first, end)`` of an epoch (whole passes, or the part up to a mid-epoch checkpoint); the stretch that reached
    the epoch's end is followed back through the stretches ending where it started (a stretch written by an
    attempt that was killed before its checkpoint persisted is left out this way)."""
    stretches: dict[tuple[int, int], list[tuple[int, int, list[str]]]] = {}
    for f in sorted((run_dir / SAMPLE_IDS_DIR).iterdir()):
        epoch, rank, first, end, _attempt = f.stem.split("-")
        stretches.setdefault((int(epoch[5:]), int(rank[4:])), []).append((int(first), int(end), f.read_text().split()))
    passes = {}
    for key, parts in stretches.items():
        tail = max(parts, key=lambda p: p[1])
        ids = tail[2]
        while tail[0] > 0:
            tail = next(p for p in parts if p[1] == tail[0])
            ids = tail[2] + ids
        passes[key] = ids
    return passes


def _check_each_pass_is_complete(run_dir: Path, epochs: int, workers: int = 1) -> dict[tuple[int, int], list[str]]:
    """The data-order guarantee: in every epoch (including one restarted or resumed inside), each rank consumed
    STEPS×BATCH/workers rows, no row twice across the ranks, none skipped beyond the drop-last remainder, and the
    order changes from epoch to epoch."""
    passes = _passes(run_dir)
    assert sorted(passes) == [(e, r) for e in range(1, epochs + 1) for r in range(workers)]
    for epoch in range(1, epochs + 1):
        ranks = [passes[(epoch, r)] for r in range(workers)]
        assert all(len(ids) == STEPS * BATCH // workers for ids in ranks)
        everyone = [i for ids in ranks for i in ids]
        assert len(set(everyone)) == STEPS * BATCH  # none twice; ROWS - STEPS×BATCH = 16 left out at most
        assert all(i.startswith("train-") for i in everyone)
    assert passes[(1, 0)] != passes[(2, 0)]
    return passes


def test_worker_killed_inside_an_epoch_resumes_at_the_next_step(ray_session: None, shards: str,
                                                                tmp_path: Path) -> None:
    """Mid-epoch checkpoints every 8 steps on 2 workers; a worker SIGKILLed in epoch 2 after one of them. The run
    resumes at the checkpoint's step (not at the epoch's start), with the samples that epoch already consumed left
    out of the rest of it: the audit shows every rank's 31 steps of the epoch once, no row twice across ranks and
    attempts. Staging and the skip list are gone at the end."""
    cfg = _cfg(shards, "train.epochs=3", "train.num_workers=2", "train.max_failures=2",
               "train.record_sample_ids=true", "train.checkpoint_every_steps=8", "train.checkpoints_to_keep=3")
    thread, result = _in_thread(lambda: run_pretraining(cfg, str(tmp_path), "m"))
    run_dir = tmp_path / "m"
    first_inside = run_dir / "checkpoint_epoch0001_img000000000512"  # epoch 2, step 8 of 31 (global batch 64)
    while thread.is_alive() and not (first_inside / "state.json").exists():
        time.sleep(0.05)
    assert first_inside.exists(), "no checkpoint inside epoch 2 was written"
    victims = train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[1], signal.SIGKILL)
    thread.join()
    assert "error" not in result, result.get("error")

    history = read_metrics(str(run_dir))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    resumed = history[1].get("resumed_at_images", 0)
    assert resumed > 0 and resumed % (8 * BATCH) == 0, history[1]  # resumed inside epoch 2, at a checkpoint
    assert "resumed_at_images" not in history[0] and "resumed_at_images" not in history[2]
    assert [r["step"] for r in history] == [STEPS, 2 * STEPS, 3 * STEPS]  # no step trained twice or skipped
    assert result["value"]["optimizer_steps"] == 3 * STEPS
    _check_each_pass_is_complete(run_dir, epochs=3, workers=2)
    assert not (run_dir / "resume" / "skip_ids.npy").exists()
    names = [Path(c).name for c in list_checkpoints(str(run_dir))]
    # Disk: Ray Train 2.60 keeps checkpoints_to_keep of those reported after the restart, but does not delete the
    # ones reported before it (seen here: 1 or 2 of them left), so the bound is checkpoints_to_keep per attempt
    # (noted on the issue).
    assert names[-1] == "checkpoint_epoch0003" and len(names) <= 2 * 3, names
    staging = Path(staging_root(str(run_dir)))
    assert not staging.exists() or list(staging.iterdir()) == []


def test_driver_killed_and_relaunched_resumes(ray_session: None, shards: str, tmp_path: Path) -> None:
    """SIGKILL the `excb pretrain` process (joined to this test's Ray instance), then run the same command again."""
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_yaml(_cfg(shards, "train.epochs=3")))
    excb = str(Path(sys.executable).with_name("excb"))
    cmd = [excb, "pretrain", "--config", str(cfg_file), "--storage-path", str(tmp_path), "--name", "d"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            before = _wait_for_epochs(tmp_path / "d", 1, lambda: first.poll() is None)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert len(before) < 3
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    history = read_metrics(str(tmp_path / "d"))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[0] == before[0]
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["optimizer_steps"] == 3 * STEPS
