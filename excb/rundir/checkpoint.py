"""Training-state checkpoints: one ``state.pt`` (plain tensors and numbers, loaded with weights_only=True) and a
``state.json`` with its SHA-256, step and epoch, in a directory named ``checkpoint_epochNNNN`` (or, inside an
epoch, ``checkpoint_epochNNNN_imgMMMMMMMMMMMM``: see :func:`checkpoint_dir_name`).

A checkpoint whose file is missing, fails its checksum or fails to load is skipped with a warning and the
previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
from typing import Any

import pyarrow.fs as pafs
import torch

from excb.storage import atomic_write_bytes, join, resolve_fs

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "state.json"
PREFIX = "checkpoint_epoch"


class CheckpointError(RuntimeError):
    """No usable checkpoint."""


def checkpoint_dir_name(epoch: int, images: int = 0) -> str:
    """``checkpoint_epochNNNN`` after ``epoch`` whole epochs; ``checkpoint_epochNNNN_imgMMMMMMMMMMMM`` for a
    mid-epoch checkpoint ``images`` samples (global, all ranks) into the next epoch. Names sort in training order,
    also across a change of the group size (the image count does not depend on it)."""
    return f"{PREFIX}{epoch:04d}" + (f"_img{images:012d}" if images else "")


def write_state_dir(state: dict[str, Any], directory: str) -> str:
    """Serialise ``state`` into ``directory`` (local or URI) atomically; returns the directory."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "epoch": int(state.get("epoch", 0)), "step": int(state.get("step", 0)),
            "epoch_images": int(state.get("epoch_images", 0))}
    fs, path = resolve_fs(directory)
    atomic_write_bytes(fs, posixpath.join(path, STATE_FILE), data)
    atomic_write_bytes(fs, posixpath.join(path, META_FILE), json.dumps(meta).encode())
    return directory


def staging_root(run_dir: str) -> str:
    """The local folder where a run stages its checkpoints before Ray Train persists them:
    ``<temp>/excb-staging/<hash of run_dir>`` (one per run, so a new attempt can clear what a killed one left)."""
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "excb-staging", digest)


def clear_staging(run_dir: str) -> None:
    """Remove whatever earlier attempts of this run left in :func:`staging_root` on this machine (a worker that
    was killed between staging and persisting a checkpoint)."""
    shutil.rmtree(staging_root(run_dir), ignore_errors=True)


def new_local_state_dir(state: dict[str, Any], run_dir: str) -> str:
    """Write ``state`` into a fresh local directory under :func:`staging_root` (for
    ``ray.train.Checkpoint.from_directory``); the caller removes it once Ray has persisted it."""
    root = staging_root(run_dir)
    os.makedirs(root, exist_ok=True)
    return write_state_dir(state, tempfile.mkdtemp(prefix="epoch-", dir=root))


def read_meta(directory: str) -> dict[str, Any]:
    """A checkpoint's small ``state.json`` (sha256 and size of the state, epoch, step, images into the next epoch);
    raises CheckpointError when it is missing or unreadable."""
    fs, path = resolve_fs(directory)
    try:
        with fs.open_input_file(posixpath.join(path, META_FILE)) as f:
            return json.loads(f.read())
    except (OSError, FileNotFoundError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {directory} is unreadable: {e}") from e


def read_state_dir(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint directory; raises CheckpointError when it is missing or corrupt."""
    meta = read_meta(directory)
    fs, path = resolve_fs(directory)
    try:
        # open_input_file: one ranged GET for the whole object (a stream reads S3 in 256 KiB requests: 45 s
        # instead of 0.3 s for a 140 MB state on the local S3 server)
        with fs.open_input_file(posixpath.join(path, STATE_FILE)) as f:
            data = f.read()
    except (OSError, FileNotFoundError) as e:
        raise CheckpointError(f"checkpoint {directory} is unreadable: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {directory} fails its checksum ({digest} != {meta.get('sha256')})")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the checkpoint is unusable
        raise CheckpointError(f"checkpoint {directory} fails to load: {e}") from e


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint directories of a run, oldest first."""
    fs, path = resolve_fs(run_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    names = sorted(os.path.basename(i.path) for i in infos
                   if i.type == pafs.FileType.Directory and os.path.basename(i.path).startswith(PREFIX))
    return [join(run_dir, n) for n in names]


def load_latest(directories: list[str], map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """The newest checkpoint among ``directories`` that verifies and loads; corrupt ones are skipped with a
    warning. Raises CheckpointError when none is usable."""
    errors = []
    for d in sorted(directories, reverse=True):
        try:
            return read_state_dir(d, map_location), d
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            errors.append(str(e))
    raise CheckpointError("no usable checkpoint" + (": " + "; ".join(errors) if errors else ""))


def finished_checkpoint(run_dir: str, epochs: int) -> str | None:
    """The checkpoint a relaunch would resume from, when it leaves nothing to train: the newest one that verifies
    and loads (as :func:`load_latest` picks it), provided it ends epoch ``epochs`` or a later one.

    ``None`` — start the worker group and let it decide — when there is no checkpoint, or when the newest one whose
    ``state.json`` reads says there is more to train (verified or not: only states that would end the run are read
    and verified here, so a relaunch of an unfinished run reads no state on the driver). A directory is returned only
    when it is exactly the one :func:`load_latest` would pick."""
    for directory in reversed(list_checkpoints(run_dir)):
        try:
            meta = read_meta(directory)
        except CheckpointError:
            continue  # unreadable: load_latest skips it too
        if int(meta.get("epoch", 0)) < epochs or int(meta.get("epoch_images", 0)):
            return None
        try:
            read_state_dir(directory)
        except CheckpointError:
            continue
        return directory
    return None
