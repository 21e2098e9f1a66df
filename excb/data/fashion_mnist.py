"""Readers for the Fashion-MNIST IDX files.

The files are looked up in, in order: the ``root`` argument, the
``EXCB_FASHION_MNIST_DIR`` environment variable and the Debian package
location ``/usr/share/datasets/fashion-mnist``. As a last resort torchvision
tries to download the data into ``~/.cache/excb/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from excb.data.errors import DatasetNotFoundError

__all__ = [
    "CLASSES",
    "ENV_VAR",
    "SYSTEM_DIR",
    "load_fashion_mnist",
    "read_idx_images",
    "read_idx_labels",
]

#: The ten Fashion-MNIST class names, indexed by label.
CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

ENV_VAR = "EXCB_FASHION_MNIST_DIR"
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_DIR = "~/.cache/excb/fashion-mnist"

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a file, transparently gunzipping it when it is gzip-compressed."""
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    return raw


def _header(data: bytes, path: str | os.PathLike[str], magic: int, ndim: int) -> list[int]:
    """Validate an IDX header and return its dimension sizes."""
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    found = int.from_bytes(data[0:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header_len + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX header says {dims} ({expected} bytes) but the file has {len(data)} bytes"
        )
    return dims


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX3 image file (``.gz`` or plain) into a uint8 array ``[N, H, W]``."""
    data = _read_bytes(path)
    n, h, w = _header(data, path, _IMAGES_MAGIC, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w).copy()


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX1 label file (``.gz`` or plain) into an int64 array ``[N]``."""
    data = _read_bytes(path)
    (n,) = _header(data, path, _LABELS_MAGIC, 1)
    return np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)


def _find_file(folder: Path, stem: str) -> Path | None:
    """Return ``folder/stem.gz`` or ``folder/stem`` if either exists."""
    for name in (f"{stem}.gz", stem):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _load_from(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Load a split from ``folder`` or return None if its files are not there."""
    prefix = _SPLIT_PREFIX[split]
    images = _find_file(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x, y = read_idx_images(images), read_idx_labels(labels)
    if len(x) != len(y):
        raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels for split {split!r}")
    return x, y


def _download_with_torchvision(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Download Fashion-MNIST with torchvision into the excb cache folder."""
    from torchvision import datasets  # imported lazily: heavy and optional here

    cache = Path(CACHE_DIR).expanduser()
    ds = datasets.FashionMNIST(str(cache), train=(split == "train"), download=True)
    return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64)


def load_fashion_mnist(
    split: str,
    root: str | None = None,
    *,
    search_system: bool = True,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split as ``(images uint8 [N,28,28], labels int64 [N])``.

    Args:
        split: ``"train"`` (60k) or ``"test"`` (10k, the ``t10k`` files).
        root: folder with the IDX files, tried first.
        search_system: also look in ``$EXCB_FASHION_MNIST_DIR`` and
            ``/usr/share/datasets/fashion-mnist`` (turn off in tests).
        download: as a last resort, let torchvision download the data.

    Raises:
        DatasetNotFoundError: nothing was found and the download failed.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root).expanduser())
    if search_system:
        env = os.environ.get(ENV_VAR)
        if env:
            candidates.append(Path(env).expanduser())
        candidates.append(Path(SYSTEM_DIR))
    for folder in candidates:
        found = _load_from(folder, split)
        if found is not None:
            return found

    download_error = "download disabled"
    if download:
        try:
            return _download_with_torchvision(split)
        except Exception as exc:  # no network, torchvision missing, bad mirror ...
            download_error = f"{type(exc).__name__}: {exc}"
    tried = "\n".join(f"  - {c}" for c in candidates) or "  (none)"
    raise DatasetNotFoundError(
        f"Fashion-MNIST split {split!r} not found. Looked in:\n{tried}\n"
        f"and the torchvision download into {CACHE_DIR} failed ({download_error}).\n"
        "To get it: `apt-get install dataset-fashion-mnist` (Debian), or set "
        f"{ENV_VAR} to a folder containing the four IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)."
    )
