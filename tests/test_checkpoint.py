"""Training-state checkpoints: atomic writes, checksums, and falling back to the previous checkpoint."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from excb.rundir.checkpoint import (
    CheckpointError,
    checkpoint_dir_name,
    finished_checkpoint,
    list_checkpoints,
    load_latest,
    read_state_dir,
    write_state_dir,
)


def _write(run: Path, epoch: int) -> Path:
    d = run / checkpoint_dir_name(epoch)
    write_state_dir({"epoch": epoch, "step": 10 * epoch, "w": torch.full((3,), float(epoch))}, str(d))
    return d


def test_round_trip_and_order(tmp_path: Path) -> None:
    for e in (2, 1, 10):
        _write(tmp_path, e)
    (tmp_path / "not_a_checkpoint").mkdir()
    names = [Path(c).name for c in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint_epoch0001", "checkpoint_epoch0002", "checkpoint_epoch0010"]
    state, where = load_latest(list_checkpoints(str(tmp_path)))
    assert Path(where).name == "checkpoint_epoch0010" and state["step"] == 100
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # no temporary files left behind


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_meta", "no_state"])
def test_corrupt_newest_falls_back_with_warning(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, 1)
    bad = _write(tmp_path, 2)
    data = (bad / "state.pt").read_bytes()
    if damage == "flip":
        (bad / "state.pt").write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        (bad / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "no_meta":
        (bad / "state.json").unlink()
    else:
        (bad / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="checkpoint_epoch0002"):
        read_state_dir(str(bad))
    with caplog.at_level(logging.WARNING, logger="excb.rundir.checkpoint"):
        state, where = load_latest(list_checkpoints(str(tmp_path)))
    assert Path(where).name == "checkpoint_epoch0001" and state["epoch"] == 1
    assert "checkpoint_epoch0002" in caplog.text


def test_no_usable_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_latest(list_checkpoints(str(tmp_path / "missing")))
    d = _write(tmp_path, 1)
    (d / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(list_checkpoints(str(tmp_path)))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    """weights_only loading: a checkpoint that would run code on load is rejected, even with a valid checksum."""
    import hashlib
    import json
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / checkpoint_dir_name(1)
    d.mkdir()
    data = pickle.dumps({"epoch": 1, "x": Boom()})
    (d / "state.pt").write_bytes(data)
    (d / "state.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(CheckpointError, match="fails to load"):
        read_state_dir(str(d))


def test_finished_checkpoint_is_the_one_a_relaunch_resumes_from_when_it_ends_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert finished_checkpoint(str(run), 1) is None  # no run yet
    _write(run, 1)
    two = _write(run, 2)
    assert finished_checkpoint(str(run), 2) == str(two)
    assert finished_checkpoint(str(run), 1) == str(two)  # fewer epochs asked for: still nothing to train
    assert finished_checkpoint(str(run), 3) is None  # a longer run: epoch 3 to train
    mid = run / checkpoint_dir_name(2, images=640)  # a checkpoint inside epoch 3 is newer
    write_state_dir({"epoch": 2, "step": 25, "epoch_images": 640}, str(mid))
    assert finished_checkpoint(str(run), 2) is None
    mid_meta = (mid / "state.json").read_bytes()
    (mid / "state.json").unlink()  # unreadable: skipped, as load_latest skips it
    assert finished_checkpoint(str(run), 2) == str(two)
    (mid / "state.json").write_bytes(mid_meta)
    (mid / "state.pt").write_bytes(b"x")
    assert finished_checkpoint(str(run), 2) is None  # says there is more to train: not read, the workers decide
    shutil.rmtree(mid)
    three = _write(run, 3)
    (three / "state.pt").write_bytes(b"x")
    assert finished_checkpoint(str(run), 2) == str(two)  # ends the run but fails its checksum: the one before
    shutil.rmtree(three)
    data = (two / "state.pt").read_bytes()
    (two / "state.pt").write_bytes(data[:-10])
    assert finished_checkpoint(str(run), 2) is None  # the relaunch resumes from epoch 1 and trains epoch 2 again
    assert finished_checkpoint(str(run), 1) == str(run / checkpoint_dir_name(1))
