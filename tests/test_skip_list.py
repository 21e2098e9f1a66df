"""The skip list of a run resumed inside an epoch: stable id hashes, rows dropped only while a list exists, a
rewritten list read again, local and S3 run directories."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from excb.data.skip_list import clear_skip_list, drop_listed, id_hashes, write_skip_list
from excb.storage import resolve_fs


def _batch(n: int) -> dict[str, np.ndarray]:
    return {"id": np.array([f"train-{i:05d}" for i in range(n)]), "image": np.arange(n * 4, dtype=np.uint8)
            .reshape(n, 1, 2, 2), "label": np.arange(n, dtype=np.int64)}


def test_id_hashes_are_stable_across_processes_and_distinct() -> None:
    ids = [f"train-{i:05d}" for i in range(5000)]
    here = id_hashes(ids)
    assert here.dtype == np.int64 and len(np.unique(here)) == len(ids)
    code = "import sys; from excb.data.skip_list import id_hashes; print(*id_hashes(sys.argv[1:]).tolist())"
    other = subprocess.run([sys.executable, "-c", code, *ids[:20]], capture_output=True, text=True, check=True)
    assert [int(x) for x in other.stdout.split()] == here[:20].tolist()  # not Python's per-process hash()
    assert id_hashes(np.array(ids[:3])).tolist() == here[:3].tolist()  # numpy strings hash like Python strings


def _roundtrip(run_dir: str) -> None:
    fs, path = resolve_fs(run_dir)
    batch = _batch(100)
    assert drop_listed(batch, fs=fs, run_path=path) is batch  # no list: every row
    write_skip_list(fs, path, id_hashes(batch["id"][10:30]))
    kept = drop_listed(batch, fs=fs, run_path=path)
    assert kept["id"].tolist() == [*batch["id"][:10], *batch["id"][30:]]
    assert kept["label"].tolist() == [*range(10), *range(30, 100)]  # every column filtered alike
    assert kept["image"].shape == (80, 1, 2, 2)
    time.sleep(0.01)
    write_skip_list(fs, path, id_hashes(batch["id"][:95]))  # a new list (longer): read again, not the cached one
    assert drop_listed(batch, fs=fs, run_path=path)["id"].tolist() == batch["id"][95:].tolist()
    clear_skip_list(fs, path)
    assert len(drop_listed(batch, fs=fs, run_path=path)["id"]) == 100
    clear_skip_list(fs, path)  # removing twice is fine


def test_rows_are_dropped_only_while_a_list_exists(tmp_path: Path) -> None:
    _roundtrip(str(tmp_path / "run"))


def test_skip_list_in_a_bucket(s3_bucket: str) -> None:
    _roundtrip(f"{s3_bucket}/runs/r1")


def test_empty_batch_and_empty_list(tmp_path: Path) -> None:
    fs, path = resolve_fs(str(tmp_path))
    write_skip_list(fs, path, np.zeros(0, dtype=np.int64))
    batch = _batch(3)
    assert drop_listed(batch, fs=fs, run_path=path) is batch
    write_skip_list(fs, path, id_hashes(["train-00001"]))
    empty = {k: v[:0] for k, v in batch.items()}
    assert drop_listed(empty, fs=fs, run_path=path) is empty
    assert pytest.approx(drop_listed(batch, fs=fs, run_path=path)["label"].tolist()) == [0, 2]
