"""Turn raw data into the prepared shard format (``excb prepare``): Fashion-MNIST IDX files and image trees.

The shard format itself (schema, writing, ``meta.json``) is :mod:`excb.data.shards`; which files count as images
is :mod:`excb.data.image_files`.
"""

from __future__ import annotations

import io
import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from excb.data.errors import DatasetNotFoundError
from excb.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from excb.data.fashion_mnist import load_fashion_mnist
from excb.data.image_files import IMAGE_EXTENSIONS, group_images, interleave, read_files
from excb.data.shards import FORMAT, write_meta, write_split
from excb.storage import resolve_fs

__all__ = ["prepare_fashion_mnist", "prepare_image_folder"]

log = logging.getLogger(__name__)

_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_PROBE_IMAGES = 8


# --------------------------------------------------------------------------- Fashion-MNIST


def _encode_png(pixels: np.ndarray) -> bytes:
    """One grayscale ``[H, W]`` uint8 image as PNG bytes (fast compression)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def prepare_fashion_mnist(
    dest: str,
    limit: int | None = None,
    rows_per_shard: int = 10000,
    root: str | None = None,
) -> dict[str, Any]:
    """Convert Fashion-MNIST into PNG shards at ``dest`` and return the meta dict.

    Args:
        dest: output folder or URI.
        limit: keep at most this many rows per split (for tests).
        rows_per_shard: rows per Parquet file.
        root: folder with the IDX files (see :func:`load_fashion_mnist`).
    """
    splits: dict[str, int] = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split, root=root)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        rows = (
            (f"{split}-{i:06d}", _encode_png(img), int(lab))
            for i, (img, lab) in enumerate(zip(images, labels, strict=True))
        )
        splits[split] = write_split(rows, dest, split, rows_per_shard)
    meta = {
        "dataset": "fashion-mnist",
        "splits": splits,
        "classes": list(FASHION_MNIST_CLASSES),
        "channels": 1,
        "image_size": 28,
        "format": FORMAT,
    }
    write_meta(dest, meta)
    return meta


# --------------------------------------------------------------------------- image folders


def _scan_split(fs: pafs.FileSystem, folder: str) -> tuple[list[str], dict[str, list[str]]]:
    """Return (images directly in ``folder``, {class: sorted image paths}) for one split."""
    return group_images(fs.get_file_info(pafs.FileSelector(folder, recursive=True)), folder)


def _probe_channels(fs: pafs.FileSystem, paths: list[str]) -> int:
    """1 if every probed image that opens is grayscale (and at least one does), else 3."""
    modes: list[str] = []
    for _path, data in read_files(fs, paths):
        try:
            with Image.open(io.BytesIO(data)) as img:
                modes.append(img.mode)
        except Exception:  # corrupt files are kept; decoding flags them later
            continue
    return 1 if modes and all(m in _GRAY_MODES for m in modes) else 3


def prepare_image_folder(
    src: str,
    dest: str,
    rows_per_shard: int = 10000,
    limit: int | None = None,
) -> dict[str, Any]:
    """Shard an ImageNet-style image tree at ``src`` into ``dest``; return the meta dict.

    Layout rules:

    * If ``src/train`` exists, the splits are the subfolders among ``train``,
      ``val`` and ``test``; ``val`` is written as split ``"test"`` (when both
      ``val`` and ``test`` exist, ``val`` wins and ``test`` is skipped).
      Otherwise the whole tree is split ``"train"``.
    * In a split, each subfolder is a class (images found recursively);
      labels index the sorted class list of the train split. Images lying
      directly in the split folder (no class subfolders) are unlabelled: no
      ``label`` column is written and ``classes`` is null.
    * Extensions: .jpg .jpeg .png .bmp .webp (any case; :func:`excb.data.image_files.is_image_file`, names
      starting with ``.`` or ``_`` included). Bytes are kept as they are (no re-encoding); ids are paths relative
      to ``src``.

    Args:
        limit: keep at most this many images per split (classes interleaved).
    """
    fs, root = resolve_fs(src)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DatasetNotFoundError(f"image folder {src!r} does not exist or is not a directory")

    def is_dir(name: str) -> bool:
        """True if ``src/name`` is a folder."""
        return fs.get_file_info(posixpath.join(root, name)).type == pafs.FileType.Directory

    layout: list[tuple[str, str]]  # (output split, folder)
    if is_dir("train"):
        layout = [("train", posixpath.join(root, "train"))]
        if is_dir("val"):
            layout.append(("test", posixpath.join(root, "val")))
            if is_dir("test"):
                log.warning("%s has both val/ and test/: writing val/ as split 'test', skipping test/", src)
        elif is_dir("test"):
            layout.append(("test", posixpath.join(root, "test")))
    else:
        layout = [("train", root)]

    scanned = [(split, folder, *_scan_split(fs, folder)) for split, folder in layout]
    classes: list[str] | None = None
    for split, folder, flat, by_class in scanned:
        if flat and by_class:
            raise ValueError(
                f"{folder}: has both images directly in it ({flat[0]!r}, ...) and class "
                f"subfolders ({next(iter(by_class))!r}, ...); put every image in a class "
                "subfolder (labelled) or none (unlabelled)"
            )
        if not flat and not by_class:
            raise DatasetNotFoundError(
                f"{folder}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if split == "train" and by_class:
            classes = sorted(by_class)
        if split != "train" and by_class:
            if classes is None:
                raise ValueError(
                    f"{folder} has class subfolders but the train split is unlabelled; "
                    "labels need the train split's class list"
                )
            unknown = sorted(set(by_class) - set(classes))
            if unknown:
                raise ValueError(f"{folder}: classes {unknown} do not exist in the train split")

    prefix = root.rstrip("/") + "/"
    plans: list[tuple[str, list[tuple[str, int | None]]]] = []
    for split, _folder, flat, by_class in scanned:
        if by_class:
            assert classes is not None
            index = {c: i for i, c in enumerate(classes)}
            items: list[tuple[str, int | None]] = [(p, index[c]) for c, p in interleave(by_class)]
        else:
            items = [(p, None) for p in flat]
        if limit is not None:
            items = items[:limit]
        plans.append((split, items))

    channels = _probe_channels(fs, [p for p, _ in plans[0][1][:_PROBE_IMAGES]])
    splits: dict[str, int] = {}
    for split, items in plans:
        label_of = dict(items)
        rows = (
            (path[len(prefix) :], data, label_of[path])
            for path, data in read_files(fs, (p for p, _ in items))
        )
        splits[split] = write_split(rows, dest, split, rows_per_shard)

    meta = {
        "dataset": posixpath.basename(root.rstrip("/")) or "images",
        "splits": splits,
        "classes": classes,
        "channels": channels,
        "image_size": None,
        "format": FORMAT,
    }
    write_meta(dest, meta)
    return meta
