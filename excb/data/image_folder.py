"""The ``image_folder`` data format: an ImageNet-style image tree read in place (no ``excb prepare``).

Layout under ``data.path`` (a local path or an ``s3://`` / ``gs://`` URI): ``train/<class>/*.jpg`` and
``val/<class>/*`` (or ``test/<class>/*``, see :mod:`excb.data.raw_layout`); images are found recursively under each
class folder, extensions .jpg .jpeg .png .bmp .webp in any case (:mod:`excb.data.image_files`). The label of an
image is the index of its class among the **sorted subfolder names of** ``train/`` (so ``val`` uses the train
indices); images lying directly in a split folder are unlabelled (label -1). Ids are paths relative to
``data.path``.

Ray Data reads the files (``read_binary_files`` with paths, which skips names starting with ``.`` or ``_``);
:func:`decode_folder_batch` decodes and resizes them on CPU in ``map_batches``, giving the columns of the shard
path: ``id``, ``image`` (uint8 ``[C, S, S]``) and ``label``. :func:`load_folder_arrays` decodes in-process for the
evaluation.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from excb.data.decode import chunks, decode_batch, decode_batches
from excb.data.errors import DatasetNotFoundError
from excb.data.image_files import (
    IMAGE_EXTENSIONS,
    IMAGE_SUFFIXES,
    group_images,
    interleave,
    is_image_file,
    read_files,
)
from excb.data.raw_layout import (
    DECODE_BATCH,
    folder_names,
    listdir,
    objects,
    split_folder,
)
from excb.storage import data_filesystem, resolve_fs

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "FolderListing",
    "count_image_folder_rows",
    "decode_folder_batch",
    "list_image_folder",
    "load_folder_arrays",
    "read_image_folder",
    "require_image_folder_split",
    "train_classes",
]


def _expected(split: str) -> str:
    """What a split folder of this format should hold, for error messages."""
    names = " or ".join(f"{n}/" for n in folder_names(split))
    return f"{names} holding <class>/*.jpg images ({', '.join(sorted(IMAGE_EXTENSIONS))})"


def _missing_split(uri: str, split: str) -> DatasetNotFoundError:
    """The error for a split whose folder does not exist."""
    return DatasetNotFoundError(f"no {split} split at {uri}: data.format=image_folder expects {_expected(split)}")


def require_image_folder_split(uri: str, split: str) -> None:
    """Check cheaply that ``split`` exists and holds an image (directly, or below a class folder; names starting
    with ``.`` or ``_`` do not count).

    Raises:
        DatasetNotFoundError: the split folder is missing or holds no images; says what was expected.
    """
    found = split_folder(uri, split)
    if found is None:
        raise _missing_split(uri, split)
    shown, folder = found
    fs, _root = resolve_fs(uri)
    entries = listdir(fs, folder)
    if any(e.type == pafs.FileType.File and is_image_file(e.base_name, skip_hidden=True) for e in entries):
        return
    for sub in sorted((e for e in entries if e.type == pafs.FileType.Directory), key=lambda e: e.path):
        if any(e.type == pafs.FileType.File and is_image_file(e.base_name, skip_hidden=True)
               for e in listdir(fs, sub.path, True)):
            return
    raise DatasetNotFoundError(f"no images in {shown}: data.format=image_folder expects {_expected(split)}")


def train_classes(uri: str) -> list[str]:
    """Sorted names of the subfolders of ``train/`` (the class list; empty for an unlabelled train split)."""
    found = split_folder(uri, "train")
    if found is None:
        return []
    fs, _root = resolve_fs(uri)
    return sorted(e.base_name for e in listdir(fs, found[1]) if e.type == pafs.FileType.Directory)


@dataclass
class FolderListing:
    """Every image of one split: ``items`` = (filesystem path, label) with classes interleaved round-robin (so any
    prefix is class-balanced), ``folder`` its filesystem path, ``classes`` the train class list."""

    folder: str
    items: list[tuple[str, int]]
    classes: list[str]


def list_image_folder(uri: str, split: str, classes: list[str] | None = None) -> FolderListing:
    """List a split of an image folder recursively (one listing; ~1 LIST request per 1000 objects on S3).
    Images are found by :func:`excb.data.image_files.group_images` (names starting with ``.`` or ``_`` included).

    Raises:
        DatasetNotFoundError: no split folder or no images in it.
        ValueError: a class folder of a non-train split does not exist in ``train/``.
    """
    found = split_folder(uri, split)
    if found is None:
        raise _missing_split(uri, split)
    shown, folder = found
    classes = train_classes(uri) if classes is None else classes
    index = {c: i for i, c in enumerate(classes)}
    fs, _root = resolve_fs(uri)
    flat, by_class = group_images(listdir(fs, folder, recursive=True), folder)
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise ValueError(f"{shown}: class folders {unknown[:5]} do not exist in the train split")
    if not flat and not by_class:
        raise DatasetNotFoundError(f"no images in {shown}: data.format=image_folder expects {_expected(split)}")
    items = [(p, index[c]) for c, p in interleave(by_class)]
    items += [(p, -1) for p in flat]
    return FolderListing(folder=folder, items=items, classes=classes)


def count_image_folder_rows(uri: str, split: str) -> int:
    """Images of ``split``: one recursive listing (:func:`list_image_folder`)."""
    return len(list_image_folder(uri, split).items)


def _relative_to(path: str, root: str) -> str:
    """``path`` relative to ``root`` (both filesystem paths; an ``s3://`` scheme on ``path`` is ignored)."""
    path = path.split("://", 1)[-1]
    root = root.rstrip("/") + "/"
    i = path.find(root)
    return path[i + len(root):] if i >= 0 else posixpath.basename(path)


def decode_folder_batch(batch: dict[str, np.ndarray], *, data_root: str, split_root: str, classes: list[str],
                        image_size: int, channels: int, strict: bool = False,
                        fit: bool = False) -> dict[str, np.ndarray]:
    """``read_binary_files(include_paths=True)`` rows (``bytes``, ``path``) → ``id``, ``image``, ``label``, ``ok``.

    The id is the path relative to ``data_root``; the label the class (first folder below ``split_root``) index
    in ``classes``, -1 for an image directly in the split folder."""
    index = {c: i for i, c in enumerate(classes)}
    paths = [str(p) for p in batch["path"]]
    labels = np.full(len(paths), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        rel = _relative_to(p, split_root)
        if "/" in rel:
            labels[i] = index.get(rel.split("/", 1)[0], -1)
    ids = np.array([_relative_to(p, data_root) for p in paths], dtype=object)
    return decode_batch({"id": ids, "image": batch["bytes"], "label": labels},
                        image_size=image_size, channels=channels, strict=strict, fit=fit)


def read_image_folder(uri: str, split: str, *, shuffle_seed: int | None = None,
                      listing: FolderListing | None = None) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Lazy Ray Data read of an image-folder split (encoded bytes + paths) and the ``fn_kwargs`` that
    :func:`decode_folder_batch` needs. With ``listing``, exactly its files are read (e.g. a class-balanced
    prefix); otherwise Ray lists the split folder itself. ``shuffle_seed`` shuffles the file order, anew on every
    execution (epoch)."""
    import ray.data

    found = split_folder(uri, split)
    if found is None:
        raise _missing_split(uri, split)
    shown, folder = found
    _fs, root = resolve_fs(uri)
    fs = data_filesystem(uri)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    paths: str | list[str] = [scheme + p for p, _ in listing.items] if listing is not None else shown
    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs, shuffle=shuffle,
                                    file_extensions=list(IMAGE_SUFFIXES))
    classes = listing.classes if listing is not None else train_classes(uri)
    return ds, {"data_root": root, "split_root": folder, "classes": classes}


def load_folder_arrays(uri: str, split: str, *, image_size: int, channels: int,
                       limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode (the first ``limit`` images of) an image-folder split in this process, classes interleaved;
    files are fetched by a small thread pool (object stores). Undecodable images are skipped."""
    listing = list_image_folder(uri, split)
    items = listing.items[:limit] if limit is not None else listing.items
    fs, _root = resolve_fs(uri)
    label_of = dict(items)
    batches = ({"id": objects([p for p, _ in chunk]), "image": objects([d for _, d in chunk]),
                "label": np.array([label_of[p] for p, _ in chunk], dtype=np.int64)}
               for chunk in chunks(read_files(fs, (p for p, _ in items)), DECODE_BATCH))
    return decode_batches(batches, decode_batch, image_size=image_size, channels=channels)
