"""The ``webdataset`` data format: WebDataset tar shards read in place (no ``excb prepare``).

Layout under ``data.path`` (a local path or an ``s3://`` / ``gs://`` URI): ``train/*.tar`` and ``val/*.tar`` (or
``test/*.tar``, see :mod:`excb.data.raw_layout`); a sample is the group of tar members sharing a key (the member
name up to the first dot of its base name): one image (``<key>.jpg``, ``.jpeg``, ``.png``, ``.webp`` or ``.bmp``)
and optionally ``<key>.cls`` holding the class index as text (-1 without). Ids are the keys. Tars and members whose
base name starts with ``.`` or ``_`` are ignored (as Ray Data's readers ignore them).

Ray Data reads the tars (``read_webdataset`` without decoding); :func:`decode_webdataset_batch` decodes and resizes
on CPU in ``map_batches``, giving the columns of the shard path: ``id``, ``image`` (uint8 ``[C, S, S]``) and
``label``. :func:`load_webdataset_arrays` decodes in-process for the evaluation.
"""

from __future__ import annotations

import itertools
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from excb.data.decode import chunks, decode_batch, decode_batches
from excb.data.errors import DatasetNotFoundError
from excb.data.image_files import is_hidden, is_image_suffix
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
    "count_webdataset_samples",
    "decode_webdataset_batch",
    "is_tar",
    "list_tars",
    "load_webdataset_arrays",
    "read_webdataset",
    "require_webdataset_split",
]

_WDS_IMAGE_ORDER = ("jpg", "jpeg", "png", "webp", "bmp")  # which member is the image when a sample has several
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset (and Ray's reader): key = name up to the first dot


def is_tar(base_name: str) -> bool:
    """True for a ``*.tar`` file name (any case) that is not hidden (``.`` or ``_`` first)."""
    return not is_hidden(base_name) and base_name.lower().endswith(".tar")


def _expected(split: str) -> str:
    """What a split folder of this format should hold, for error messages."""
    names = " or ".join(f"{n}/" for n in folder_names(split))
    return f"{names} holding *.tar shards (WebDataset: <key>.jpg + <key>.cls)"


def _no_tars(uri: str, split: str) -> DatasetNotFoundError:
    """The error for a split without tar shards."""
    return DatasetNotFoundError(f"no *.tar shards for split {split!r} at {uri}: data.format=webdataset expects "
                                f"{_expected(split)}")


def require_webdataset_split(uri: str, split: str) -> None:
    """Check cheaply that ``split`` exists and holds a ``*.tar`` file (one listing, not a full scan).

    Raises:
        DatasetNotFoundError: the split folder is missing or holds no tars; says what was expected.
    """
    found = split_folder(uri, split)
    if found is None:
        raise DatasetNotFoundError(f"no {split} split at {uri}: data.format=webdataset expects {_expected(split)}")
    shown, folder = found
    fs, _root = resolve_fs(uri)
    if not any(e.type == pafs.FileType.File and is_tar(e.base_name) for e in listdir(fs, folder)):
        raise DatasetNotFoundError(f"no *.tar shards in {shown}: data.format=webdataset expects {_expected(split)}")


def list_tars(uri: str, split: str) -> list[str]:
    """Sorted filesystem paths of the ``*.tar`` shards of ``split`` (non-recursive; empty if none)."""
    found = split_folder(uri, split)
    if found is None:
        return []
    fs, _root = resolve_fs(uri)
    return sorted(e.path for e in listdir(fs, found[1]) if e.type == pafs.FileType.File and is_tar(e.base_name))


def _select_image_members(name: str) -> bool:
    """``read_webdataset(fileselect=...)`` for the counting pass: only image members are read into rows."""
    return is_image_suffix(name.rsplit(".", 1)[-1])


def _as_bytes(value: Any) -> bytes | None:
    """``value`` as bytes if it is binary, else None."""
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def _parse_cls(value: Any) -> int:
    """The class index in a ``.cls`` member (text or int), -1 if there is none."""
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
        raise _no_tars(uri, split)
    shown, _folder = split_folder(uri, split)  # type: ignore[misc]
    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    return ray.data.read_webdataset(shown, filesystem=data_filesystem(uri), decoder=None, shuffle=shuffle,
                                    file_extensions=["tar"])


def count_webdataset_samples(uri: str, split: str) -> int:
    """Samples with an image member in the tars of ``split``: one distributed Ray Data pass over every tar
    (tar shards carry no index; it reads all bytes once, so give ``data.train_rows`` when the count is known)."""
    import ray.data

    shown, _folder = split_folder(uri, split)  # type: ignore[misc]
    ds = ray.data.read_webdataset(shown, filesystem=data_filesystem(uri), decoder=None, file_extensions=["tar"],
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
            if match is None or is_hidden(posixpath.basename(member.name)):
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
        raise _no_tars(uri, split)
    fs, _root = resolve_fs(uri)
    samples = itertools.islice(itertools.chain.from_iterable(_iter_tar_samples(fs, path) for path in tars), limit)
    batches = (_sample_batch(rows) for rows in chunks(samples, DECODE_BATCH))
    return decode_batches(batches, decode_webdataset_batch, image_size=image_size, channels=channels)


def _sample_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Tar samples ({"__key__", suffix: bytes}) as one column batch, None where a sample lacks a suffix."""
    suffixes = {s for r in rows for s in r if s != "__key__"}
    return {"__key__": objects([r["__key__"] for r in rows]),
            **{s: objects([r.get(s) for r in rows]) for s in suffixes}}
