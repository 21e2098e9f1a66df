"""Where the splits of a raw dataset (image folder or WebDataset tars, read in place) live, and the helpers both
raw formats share.

Split ``"train"`` is the folder ``train/``; split ``"test"`` is ``val/`` if it exists, else ``test/``.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from excb.storage import join, resolve_fs

__all__ = ["DECODE_BATCH", "folder_names", "listdir", "objects", "split_folder"]

DECODE_BATCH = 256  # rows per batch when decoding in-process (evaluation)


def folder_names(split: str) -> tuple[str, ...]:
    """The folder names that may hold ``split``, in order of preference (``test``: ``val`` then ``test``)."""
    return ("val", "test") if split == "test" else (split,)


def split_folder(uri: str, split: str) -> tuple[str, str] | None:
    """``(uri of the split folder, its filesystem path)`` for ``train`` / ``test`` (``val`` first), or None."""
    fs, root = resolve_fs(uri)
    for name in folder_names(split):
        path = posixpath.join(root, name)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            return join(uri, name) if "://" in uri else path, path
    return None


def listdir(fs: pafs.FileSystem, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """The entries of ``folder`` on ``fs`` (recursively if asked; empty if it does not exist)."""
    return fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))


def objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array of ``values`` (bytes, str or None), never split into more dimensions."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
