"""The registry of data formats (``data.format``): one entry per name — ``shards``, ``image_folder``,
``webdataset`` — a small frozen object saying how to read, count, check and load a split of that format.

The entries live in :data:`DATA_FORMAT_REGISTRY` (an :class:`excb.registry.Registry`, like the backbones and
balancers) and are built from keyword arguments, each taking the options it needs (``retries`` for shards,
``known_rows`` for the raw formats). Callers get one with :func:`data_format` instead of branching on the name;
:func:`detect_format` finds the format of a split on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import pyarrow.fs as pafs

from excb.data.decode import decode_batch
from excb.data.errors import DatasetNotFoundError
from excb.data.image_folder import (
    count_image_folder_rows,
    decode_folder_batch,
    list_image_folder,
    load_folder_arrays,
    read_image_folder,
    require_image_folder_split,
)
from excb.data.raw_layout import folder_names, listdir, split_folder
from excb.data.shard_reader import load_shard_arrays, read_split, require_shard_split
from excb.data.shards import list_shards, verify_shards
from excb.data.webdataset import (
    count_webdataset_samples,
    decode_webdataset_batch,
    is_tar,
    load_webdataset_arrays,
    read_webdataset,
    require_webdataset_split,
)
from excb.registry import Registry
from excb.storage import resolve_fs

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "DATA_FORMAT_REGISTRY",
    "FORMATS",
    "DataFormat",
    "ImageFolderFormat",
    "RawSplit",
    "ShardFormat",
    "WebDatasetFormat",
    "data_format",
    "detect_format",
    "require_split",
]

DecodeFn = Callable[..., dict[str, np.ndarray]]


class RawSplit(NamedTuple):
    """An undecoded split: the lazy Ray dataset, the batch function that decodes it in ``map_batches`` (giving
    ``id``, ``image``, ``label``, ``ok``) and the extra keyword arguments that function needs."""

    dataset: ray.data.Dataset
    decode: DecodeFn
    decode_kwargs: dict[str, Any]


class DataFormat(Protocol):
    """What every registry entry offers for a split of its format at ``uri``."""

    def read_raw(self, uri: str, split: str, *, limit: int | None, shuffle_seed: int | None) -> RawSplit:
        """Read the split lazily with Ray Data, undecoded: only its first ``limit`` rows if ``limit``; the file
        order shuffled anew on every pass if ``shuffle_seed`` is not None."""
        ...

    def count_rows(self, uri: str, split: str) -> int:
        """Rows of the split before decoding, as cheaply as the format allows."""
        ...

    def require_split(self, uri: str, split: str) -> None:
        """Check cheaply that the split exists and is not empty, else raise
        :class:`~excb.data.errors.DatasetNotFoundError` saying what was expected."""
        ...

    def load_arrays(self, uri: str, split: str, *, image_size: int, channels: int,
                    limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decode (the first ``limit`` rows of) the split in this process, in a deterministic order, skipping
        undecodable rows: ``(images uint8 [N, C, S, S], labels int64 [N])``."""
        ...


@dataclass(frozen=True, kw_only=True)
class ShardFormat:
    """Prepared Parquet shards (:mod:`excb.data.shards`); ``retries``: attempts per footer read when counting."""

    retries: int = 3

    def read_raw(self, uri: str, split: str, *, limit: int | None, shuffle_seed: int | None) -> RawSplit:
        """The shards through :func:`~excb.data.shard_reader.read_split`, cut to ``limit`` rows."""
        ds = read_split(uri, split, shuffle_seed=shuffle_seed)
        return RawSplit(ds.limit(limit) if limit else ds, decode_batch, {})

    def count_rows(self, uri: str, split: str) -> int:
        """The row counts in the Parquet footers (:func:`~excb.data.shards.verify_shards`)."""
        return verify_shards(uri, split, retries=self.retries)

    def require_split(self, uri: str, split: str) -> None:
        """:func:`~excb.data.shard_reader.require_shard_split`."""
        require_shard_split(uri, split)

    def load_arrays(self, uri: str, split: str, *, image_size: int, channels: int,
                    limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~excb.data.shard_reader.load_shard_arrays`: shard file, then row order."""
        return load_shard_arrays(uri, split, image_size=image_size, channels=channels, limit=limit)


@dataclass(frozen=True, kw_only=True)
class ImageFolderFormat:
    """An image tree read in place (:mod:`excb.data.image_folder`); ``known_rows`` > 0 is taken as the row count
    instead of listing the split."""

    known_rows: int = 0

    def read_raw(self, uri: str, split: str, *, limit: int | None, shuffle_seed: int | None) -> RawSplit:
        """The image files through :func:`~excb.data.image_folder.read_image_folder`; with ``limit``, exactly the
        first ``limit`` files of the class-interleaved listing."""
        listing = None
        if limit:
            listing = list_image_folder(uri, split)
            listing.items = listing.items[:limit]
        ds, kwargs = read_image_folder(uri, split, shuffle_seed=shuffle_seed, listing=listing)
        return RawSplit(ds, decode_folder_batch, kwargs)

    def count_rows(self, uri: str, split: str) -> int:
        """``known_rows`` if > 0, else one recursive listing."""
        return self.known_rows if self.known_rows > 0 else count_image_folder_rows(uri, split)

    def require_split(self, uri: str, split: str) -> None:
        """:func:`~excb.data.image_folder.require_image_folder_split`."""
        require_image_folder_split(uri, split)

    def load_arrays(self, uri: str, split: str, *, image_size: int, channels: int,
                    limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~excb.data.image_folder.load_folder_arrays`: classes interleaved."""
        return load_folder_arrays(uri, split, image_size=image_size, channels=channels, limit=limit)


@dataclass(frozen=True, kw_only=True)
class WebDatasetFormat:
    """WebDataset tars read in place (:mod:`excb.data.webdataset`); ``known_rows`` > 0 is taken as the row count
    instead of a Ray Data pass over every tar."""

    known_rows: int = 0

    def read_raw(self, uri: str, split: str, *, limit: int | None, shuffle_seed: int | None) -> RawSplit:
        """The tar samples through :func:`~excb.data.webdataset.read_webdataset`, cut to ``limit`` rows."""
        ds = read_webdataset(uri, split, shuffle_seed=shuffle_seed)
        return RawSplit(ds.limit(limit) if limit else ds, decode_webdataset_batch, {})

    def count_rows(self, uri: str, split: str) -> int:
        """``known_rows`` if > 0, else one Ray Data pass over every tar."""
        return self.known_rows if self.known_rows > 0 else count_webdataset_samples(uri, split)

    def require_split(self, uri: str, split: str) -> None:
        """:func:`~excb.data.webdataset.require_webdataset_split`."""
        require_webdataset_split(uri, split)

    def load_arrays(self, uri: str, split: str, *, image_size: int, channels: int,
                    limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~excb.data.webdataset.load_webdataset_arrays`: tar file, then member order."""
        return load_webdataset_arrays(uri, split, image_size=image_size, channels=channels, limit=limit)


DATA_FORMAT_REGISTRY: Registry[DataFormat] = Registry("data format")
DATA_FORMAT_REGISTRY.register("shards")(ShardFormat)
DATA_FORMAT_REGISTRY.register("image_folder")(ImageFolderFormat)
DATA_FORMAT_REGISTRY.register("webdataset")(WebDatasetFormat)
FORMATS: tuple[str, ...] = DATA_FORMAT_REGISTRY.names()


def data_format(name: str, /, **options: Any) -> DataFormat:
    """The data format ``name`` built from ``options`` (each entry takes those it names: ``retries``,
    ``known_rows``).

    Raises:
        ValueError: ``name`` is not a known format; the message lists the known ones.
    """
    return DATA_FORMAT_REGISTRY.build(name, **options)


def require_split(uri: str, split: str, fmt: str) -> None:
    """Check cheaply that ``split`` of format ``fmt`` exists and is not empty (one listing, not a full scan).

    Raises:
        DatasetNotFoundError: the split is missing or holds no shards / images / tars; says what was expected.
        ValueError: ``fmt`` is not a known format.
    """
    data_format(fmt).require_split(uri, split)


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
            f"or {' or '.join(f'{n}/' for n in folder_names(split))} with <class>/*.jpg images or *.tar shards")
    fs, _root = resolve_fs(uri)
    if any(e.type == pafs.FileType.File and is_tar(e.base_name) for e in listdir(fs, found[1])):
        return "webdataset"
    return "image_folder"
