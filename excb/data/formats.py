"""Raw image datasets read in place (no ``excb prepare``): ImageNet-style image folders and WebDataset tars.

Layouts under ``data.path`` (a local path or an ``s3://`` / ``gs://`` URI):

* ``image_folder``: ``train/<class>/*.jpg`` and ``val/<class>/*`` (or ``test/<class>/*``); images are found
  recursively under each class folder, extensions .jpg .jpeg .png .bmp .webp in any case. The label of an image is
  the index of its class among the **sorted subfolder names of** ``train/`` (so ``val`` uses the train indices);
  images lying directly in a split folder are unlabelled (label -1). Ids are paths relative to ``data.path``.
* ``webdataset``: ``train/*.tar`` and ``val/*.tar`` (or ``test/*.tar``); a sample is the group of tar members
  sharing a key (the member name up to the first dot of its base name): one image (``<key>.jpg``, ``.jpeg``,
  ``.png``, ``.webp`` or ``.bmp``) and optionally ``<key>.cls`` holding the class index as text (-1 without).
  Ids are the keys.

Split ``"train"`` is ``train/``; split ``"test"`` is ``val/`` if it exists, else ``test/``. Files whose base name
starts with ``.`` or ``_`` are ignored (as Ray Data's readers ignore them).

Both layouts are read by Ray Data (``read_binary_files`` with paths / ``read_webdataset`` without decoding) and
decoded and resized on CPU in ``map_batches`` with :func:`excb.data.decode.decode_batch`, giving the same
columns as the shard path: ``id``, ``image`` (uint8 ``[C, S, S]``) and ``label``. In-process readers
(:func:`load_folder_arrays`, :func:`load_webdataset_arrays`) serve the evaluation.
"""

from __future__ import annotations

import io
import itertools
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from excb.data.decode import chunks, decode_batch, decode_batches
from excb.data.errors import DatasetNotFoundError
from excb.data.shards import IMAGE_EXTENSIONS, _interleave, _read_files, group_images, list_shards
from excb.storage import join, ray_filesystem, resolve_fs

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "FORMATS",
    "FolderListing",
    "count_webdataset_samples",
    "decode_folder_batch",
    "decode_webdataset_batch",
    "detect_format",
    "list_image_folder",
    "list_tars",
    "load_folder_arrays",
    "load_webdataset_arrays",
    "read_image_folder",
    "read_webdataset",
    "require_split",
    "split_folder",
    "tar_bytes",
    "train_classes",
]

FORMATS = ("shards", "image_folder", "webdataset")
IMAGE_SUFFIXES = tuple(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))  # bmp jpeg jpg png webp
_WDS_IMAGE_ORDER = ("jpg", "jpeg", "png", "webp", "bmp")  # which member is the image when a sample has several
_DECODE_BATCH = 256
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset (and Ray's reader): key = name up to the first dot


def _folder_names(split: str) -> tuple[str, ...]:
    return ("val", "test") if split == "test" else (split,)


def _hidden(base_name: str) -> bool:
    return base_name.startswith((".", "_"))


def _is_image(base_name: str) -> bool:
    return not _hidden(base_name) and posixpath.splitext(base_name)[1].lower() in IMAGE_EXTENSIONS


def _is_tar(base_name: str) -> bool:
    return not _hidden(base_name) and base_name.lower().endswith(".tar")


def split_folder(uri: str, split: str) -> tuple[str, str] | None:
    """``(uri of the split folder, its filesystem path)`` for ``train`` / ``test`` (``val`` first), or None."""
    fs, root = resolve_fs(uri)
    for name in _folder_names(split):
        path = posixpath.join(root, name)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            return join(uri, name) if "://" in uri else path, path
    return None


def _listdir(fs: pafs.FileSystem, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
    return fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))


def _expected(fmt: str, split: str) -> str:
    names = " or ".join(f"{n}/" for n in _folder_names(split))
    if fmt == "webdataset":
        return f"{names} holding *.tar shards (WebDataset: <key>.jpg + <key>.cls)"
    return f"{names} holding <class>/*.jpg images ({', '.join(sorted(IMAGE_EXTENSIONS))})"


def require_split(uri: str, split: str, fmt: str) -> None:
    """Check cheaply that ``split`` exists and is not empty (one listing, not a full scan).

    Raises:
        DatasetNotFoundError: the split folder is missing or holds no images / tars; says what was expected.
    """
    if fmt == "shards":
        if not list_shards(uri, split):
            raise DatasetNotFoundError(f"no shards for split {split!r} at {join(uri, split)} (expected "
                                       "part-*.parquet files); create them with `excb prepare`")
        return
    found = split_folder(uri, split)
    if found is None:
        raise DatasetNotFoundError(f"no {split} split at {uri}: data.format={fmt} expects {_expected(fmt, split)}")
    shown, folder = found
    fs, _root = resolve_fs(uri)
    entries = _listdir(fs, folder)
    files = [e for e in entries if e.type == pafs.FileType.File]
    if fmt == "webdataset":
        if not any(_is_tar(e.base_name) for e in files):
            raise DatasetNotFoundError(f"no *.tar shards in {shown}: data.format=webdataset expects "
                                       f"{_expected(fmt, split)}")
        return
    if any(_is_image(e.base_name) for e in files):
        return
    for sub in sorted((e for e in entries if e.type == pafs.FileType.Directory), key=lambda e: e.path):
        if any(e.type == pafs.FileType.File and _is_image(e.base_name) for e in _listdir(fs, sub.path, True)):
            return
    raise DatasetNotFoundError(f"no images in {shown}: data.format=image_folder expects {_expected(fmt, split)}")


def detect_format(uri: str, split: str) -> str:
    """The layout of ``split`` at ``uri``: ``shards`` (part-*.parquet), ``webdataset`` (*.tar) or ``image_folder``.

    Raises:
        DatasetNotFoundError: none of them is there.
    """
    if list_shards(uri, split):
        return "shards"
    found = split_folder(uri, split)
    if found is None:
        raise DatasetNotFoundError(
            f"no split {split!r} at {uri}: expected {split}/part-*.parquet shards (`excb prepare`), "
            f"or {' or '.join(f'{n}/' for n in _folder_names(split))} with <class>/*.jpg images or *.tar shards")
    fs, _root = resolve_fs(uri)
    if any(e.type == pafs.FileType.File and _is_tar(e.base_name) for e in _listdir(fs, found[1])):
        return "webdataset"
    return "image_folder"


# --------------------------------------------------------------------------- image folders


def train_classes(uri: str) -> list[str]:
    """Sorted names of the subfolders of ``train/`` (the class list; empty for an unlabelled train split)."""
    found = split_folder(uri, "train")
    if found is None:
        return []
    fs, _root = resolve_fs(uri)
    return sorted(e.base_name for e in _listdir(fs, found[1]) if e.type == pafs.FileType.Directory)


@dataclass
class FolderListing:
    """Every image of one split: ``items`` = (filesystem path, label) with classes interleaved round-robin (so any
    prefix is class-balanced), ``folder`` its filesystem path, ``classes`` the train class list."""

    folder: str
    items: list[tuple[str, int]]
    classes: list[str]


def list_image_folder(uri: str, split: str, classes: list[str] | None = None) -> FolderListing:
    """List a split of an image folder recursively (one listing; ~1 LIST request per 1000 objects on S3).

    Raises:
        DatasetNotFoundError: no split folder or no images in it.
        ValueError: a class folder of a non-train split does not exist in ``train/``.
    """
    found = split_folder(uri, split)
    if found is None:
        raise DatasetNotFoundError(f"no {split} split at {uri}: data.format=image_folder expects "
                                   f"{_expected('image_folder', split)}")
    shown, folder = found
    classes = train_classes(uri) if classes is None else classes
    index = {c: i for i, c in enumerate(classes)}
    fs, _root = resolve_fs(uri)
    flat, by_class = group_images(_listdir(fs, folder, recursive=True), folder)
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise ValueError(f"{shown}: class folders {unknown[:5]} do not exist in the train split")
    if not flat and not by_class:
        raise DatasetNotFoundError(f"no images in {shown}: data.format=image_folder expects "
                                   f"{_expected('image_folder', split)}")
    items = [(p, index[c]) for c, p in _interleave(by_class)]
    items += [(p, -1) for p in flat]
    return FolderListing(folder=folder, items=items, classes=classes)


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
        raise DatasetNotFoundError(f"no {split} split at {uri}: data.format=image_folder expects "
                                   f"{_expected('image_folder', split)}")
    shown, folder = found
    _fs, root = resolve_fs(uri)
    fs = ray_filesystem(uri)
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
    batches = ({"id": _objects([p for p, _ in chunk]), "image": _objects([d for _, d in chunk]),
                "label": np.array([label_of[p] for p, _ in chunk], dtype=np.int64)}
               for chunk in chunks(_read_files(fs, (p for p, _ in items)), _DECODE_BATCH))
    return decode_batches(batches, decode_batch, image_size=image_size, channels=channels)


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array of ``values`` (bytes, str or None), never split into more dimensions."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# --------------------------------------------------------------------------- WebDataset tars


def list_tars(uri: str, split: str) -> list[str]:
    """Sorted filesystem paths of the ``*.tar`` shards of ``split`` (non-recursive; empty if none)."""
    found = split_folder(uri, split)
    if found is None:
        return []
    fs, _root = resolve_fs(uri)
    return sorted(e.path for e in _listdir(fs, found[1]) if e.type == pafs.FileType.File and _is_tar(e.base_name))


def _image_suffix(suffix: str) -> bool:
    return suffix.lower() in IMAGE_SUFFIXES


def _select_image_members(name: str) -> bool:
    """``read_webdataset(fileselect=...)`` for the counting pass: only image members are read into rows."""
    return _image_suffix(name.rsplit(".", 1)[-1])


def _as_bytes(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def _parse_cls(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode().strip()
    if isinstance(value, str):
        return int(value) if value.lstrip("-").isdigit() else -1
    if isinstance(value, (int, np.integer)):
        return int(value)
    return -1


def decode_webdataset_batch(batch: dict[str, np.ndarray], *, image_size: int, channels: int,
                            strict: bool = False, fit: bool = False) -> dict[str, np.ndarray]:
    """``read_webdataset(decoder=None)`` rows (``__key__``, image member bytes, ``cls``) → ``id``, ``image``,
    ``label``, ``ok``. A sample without an image member is a corrupt row (``ok=False``; with ``strict``, an error
    naming the key)."""
    keys = np.asarray([str(k) for k in batch["__key__"]], dtype=object)
    n = len(keys)
    encoded = np.empty(n, dtype=object)
    columns = {c.lower(): c for c in batch if not c.startswith("__")}
    for suffix in _WDS_IMAGE_ORDER:
        if suffix in columns:
            col = batch[columns[suffix]]
            for i in range(n):
                if encoded[i] is None:
                    encoded[i] = _as_bytes(col[i])
    for i in range(n):
        if encoded[i] is None:
            encoded[i] = b""  # decodes as corrupt
    cls = batch[columns["cls"]] if "cls" in columns else [None] * n
    labels = np.array([_parse_cls(v) for v in cls], dtype=np.int64)
    return decode_batch({"id": keys, "image": encoded, "label": labels}, image_size=image_size,
                        channels=channels, strict=strict, fit=fit)


def read_webdataset(uri: str, split: str, *, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """Lazy Ray Data read of the tars of ``split`` without decoding (members as bytes, one row per key).
    ``shuffle_seed`` shuffles the order of the tar files, anew on every execution (epoch); the order inside a tar
    is kept (WebDataset shards are written shuffled; the trainer's local shuffle buffer mixes further)."""
    import ray.data

    if not list_tars(uri, split):
        raise DatasetNotFoundError(f"no *.tar shards for split {split!r} at {uri}: data.format=webdataset expects "
                                   f"{_expected('webdataset', split)}")
    shown, _folder = split_folder(uri, split)  # type: ignore[misc]
    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    return ray.data.read_webdataset(shown, filesystem=ray_filesystem(uri), decoder=None, shuffle=shuffle,
                                    file_extensions=["tar"])


def count_webdataset_samples(uri: str, split: str) -> int:
    """Samples with an image member in the tars of ``split``: one distributed Ray Data pass over every tar
    (tar shards carry no index; it reads all bytes once, so give ``data.train_rows`` when the count is known)."""
    import ray.data

    shown, _folder = split_folder(uri, split)  # type: ignore[misc]
    ds = ray.data.read_webdataset(shown, filesystem=ray_filesystem(uri), decoder=None, file_extensions=["tar"],
                                  fileselect=_select_image_members)
    return int(ds.select_columns(["__key__"]).count())


def _iter_tar_samples(fs: pafs.FileSystem, path: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar in order: ``{"__key__": key, suffix: bytes, ...}`` (members grouped by key)."""
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        sample: dict[str, Any] | None = None
        for member in tar:
            if not member.isreg():
                continue
            match = _KEY.match(member.name)
            if match is None or _hidden(posixpath.basename(member.name)):
                continue
            key, suffix = match.group(1), match.group(2)
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            sample[suffix] = data
        if sample is not None:
            yield sample


def load_webdataset_arrays(uri: str, split: str, *, image_size: int, channels: int,
                           limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode (the first ``limit`` samples of) the tars of ``split`` in this process, tars in sorted order.
    Samples without a decodable image are skipped."""
    tars = list_tars(uri, split)
    if not tars:
        raise DatasetNotFoundError(f"no *.tar shards for split {split!r} at {uri}: data.format=webdataset expects "
                                   f"{_expected('webdataset', split)}")
    fs, _root = resolve_fs(uri)
    samples = itertools.islice(itertools.chain.from_iterable(_iter_tar_samples(fs, path) for path in tars), limit)
    batches = (_sample_batch(rows) for rows in chunks(samples, _DECODE_BATCH))
    return decode_batches(batches, decode_webdataset_batch, image_size=image_size, channels=channels)


def _sample_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Tar samples ({"__key__", suffix: bytes}) as one column batch, None where a sample lacks a suffix."""
    suffixes = {s for r in rows for s in r if s != "__key__"}
    return {"__key__": _objects([r["__key__"] for r in rows]),
            **{s: _objects([r.get(s) for r in rows]) for s in suffixes}}


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding ``(name, data)`` members in order (for writing WebDataset shards)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
