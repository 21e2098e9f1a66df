"""Read prepared shards (the ``shards`` data format, :mod:`excb.data.shards`): lazily with Ray Data for training,
or in this process for evaluation."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.dataset as pads

from excb.data.decode import decode_batch, decode_batches
from excb.data.errors import DatasetNotFoundError
from excb.data.shards import list_shards
from excb.storage import data_filesystem, join, resolve_fs

if TYPE_CHECKING:
    import ray.data

__all__ = ["load_shard_arrays", "read_split", "require_shard_split"]


def _split_uri(uri: str, split: str) -> str:
    """``uri/split`` with plain paths made absolute (Ray workers may run elsewhere)."""
    if "://" in uri:
        return posixpath.join(uri.rstrip("/"), split)
    _fs, root = resolve_fs(uri)
    return posixpath.join(root, split)


def _require_shards(uri: str, split: str) -> list[str]:
    """The shard paths of ``split`` for reading it (:func:`excb.data.shards.list_shards`).

    Raises:
        DatasetNotFoundError: there are none; says how to create them.
    """
    shards = list_shards(uri, split)
    if not shards:
        raise DatasetNotFoundError(
            f"no shards for split {split!r} at {_split_uri(uri, split)!r} "
            "(expected part-*.parquet files). Create them with `excb prepare` "
            f"(e.g. `excb prepare fashion-mnist --dest {uri}`)."
        )
    return shards


def require_shard_split(uri: str, split: str) -> None:
    """Check cheaply that ``split`` has shards (one listing), for the pre-flight check of ``data.format=shards``.

    Raises:
        DatasetNotFoundError: it has none.
    """
    if not list_shards(uri, split):
        raise DatasetNotFoundError(f"no shards for split {split!r} at {join(uri, split)} (expected "
                                   "part-*.parquet files); create them with `excb prepare`")


def read_split(uri: str, split: str, *, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """Lazily read the Parquet shards of ``split`` as a :class:`ray.data.Dataset`.

    For URIs, Ray's tasks get :func:`excb.storage.data_filesystem` (the configured endpoint and credentials).
    ``shuffle_seed`` shuffles the order of the shard files, anew on every execution.

    Raises:
        DatasetNotFoundError: the split folder is missing or has no shards.
    """
    import ray.data

    _require_shards(uri, split)
    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    return ray.data.read_parquet(
        _split_uri(uri, split), file_extensions=["parquet"], filesystem=data_filesystem(uri), shuffle=shuffle
    )


def load_shard_arrays(uri: str, split: str, *, image_size: int, channels: int,
                      limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode (the first ``limit`` rows of) the shards of ``split`` in this process, in shard-file then row
    order; undecodable rows are skipped.

    Raises:
        DatasetNotFoundError: the split has no shards.
    """
    shards = _require_shards(uri, split)
    fs, _root = resolve_fs(uri)
    dataset = pads.dataset(shards, filesystem=fs, format="parquet")
    columns = [c for c in ("id", "image", "label") if c in dataset.schema.names]

    def batches() -> Iterator[dict[str, np.ndarray]]:
        """Column batches, one per shard, until ``limit`` rows."""
        remaining = limit
        for fragment in dataset.get_fragments():  # same order as `shards` (sorted)
            if remaining is not None and remaining <= 0:
                break
            table = fragment.to_table(columns=columns)
            if remaining is not None:
                table = table.slice(0, remaining)
                remaining -= table.num_rows
            yield {name: table[name].to_numpy(zero_copy_only=False) for name in columns}

    return decode_batches(batches(), decode_batch, image_size=image_size, channels=channels)
