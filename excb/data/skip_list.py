"""Resuming inside an epoch: the samples the interrupted attempt already trained on are left out of the rest of it.

A mid-epoch checkpoint holds the 64-bit hashes of the sample ids every rank consumed so far in the epoch. When a
run resumes from it, rank 0 writes those hashes to ``RUN/resume/skip_ids.npy`` before the pass starts, and the
training dataset drops the rows whose id hash is listed (:func:`drop_listed`, a Ray Data ``map_batches`` step
that reads the list when the pass executes). The remaining rows are then split equally over the ranks as usual,
so the rest of the epoch consumes each remaining sample at most once and none of the consumed ones again. When the
resumed epoch ends, rank 0 removes the list, and later passes are whole again.

Ray Data starts executing a pass only when every rank has asked for it (the streaming split's epoch barrier), so
a list written by rank 0 before it starts iterating is seen by every task of that pass.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from excb.storage import atomic_write_bytes, delete_quietly

SKIP_LIST = "resume/skip_ids.npy"

_cache: dict[str, tuple[Any, np.ndarray]] = {}
_lock = threading.Lock()


def id_hashes(ids: Iterable[Any]) -> np.ndarray:
    """``h(id) = first 8 bytes of BLAKE2b(str(id))`` as int64, one per id (stable across processes and machines,
    unlike Python's ``hash``; collisions are negligible below billions of ids)."""
    out = [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True)
           for i in ids]
    return np.asarray(out, dtype=np.int64)


def write_skip_list(fs: pafs.FileSystem, run_path: str, hashes: np.ndarray) -> None:
    """Atomically write the sorted hashes the resumed pass must leave out."""
    buf = io.BytesIO()
    np.save(buf, np.unique(np.asarray(hashes, dtype=np.int64)))
    atomic_write_bytes(fs, posixpath.join(run_path, SKIP_LIST), buf.getvalue())


def clear_skip_list(fs: pafs.FileSystem, run_path: str) -> None:
    """Remove the list (the resumed epoch is over, or the run resumes at an epoch boundary)."""
    delete_quietly(fs, posixpath.join(run_path, SKIP_LIST))


def _current_list(fs: pafs.FileSystem, path: str) -> np.ndarray | None:
    """The list at ``path`` (sorted int64), or None when there is none; read again only when its size or
    modification time changes."""
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    key = (info.size, info.mtime_ns)
    with _lock:
        cached = _cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
    with fs.open_input_stream(path) as f:
        hashes = np.load(io.BytesIO(f.read()), allow_pickle=False)
    with _lock:
        _cache[path] = (key, hashes)
    return hashes


def drop_listed(batch: dict[str, np.ndarray], *, fs: pafs.FileSystem, run_path: str) -> dict[str, np.ndarray]:
    """The rows of ``batch`` whose ``h(id)`` is not in the run's skip list (all rows when there is no list)."""
    listed = _current_list(fs, posixpath.join(run_path, SKIP_LIST))
    if listed is None or len(listed) == 0 or len(batch["id"]) == 0:
        return batch
    keep = ~np.isin(id_hashes(batch["id"]), listed, assume_unique=False)
    return batch if keep.all() else {k: v[keep] for k, v in batch.items()}
