"""Ray Data and single-process readers for prepared shard datasets."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from excb.data.decode import decode_batch
from excb.data.errors import CorruptImageError, DatasetNotFoundError
from excb.data.shards import list_shards, resolve_fs
from excb.storage import ray_filesystem

if TYPE_CHECKING:
    import ray.data

__all__ = ["DecodedSplit", "decoded_split", "load_split_arrays", "read_split"]

_MAX_CORRUPT_IDS = 10
_DECODE_BATCH_SIZE = 1024


def _split_uri(uri: str, split: str) -> str:
    """``uri/split`` with plain paths made absolute (Ray workers may run elsewhere)."""
    if "://" in uri:
        return posixpath.join(uri.rstrip("/"), split)
    _fs, root = resolve_fs(uri)
    return posixpath.join(root, split)


def _require_shards(uri: str, split: str) -> list[str]:
    shards = list_shards(uri, split)
    if not shards:
        raise DatasetNotFoundError(
            f"no shards for split {split!r} at {_split_uri(uri, split)!r} "
            "(expected part-*.parquet files). Create them with `excb prepare` "
            f"(e.g. `excb prepare fashion-mnist --dest {uri}`)."
        )
    return shards


def read_split(uri: str, split: str) -> ray.data.Dataset:
    """Lazily read the Parquet shards of ``split`` as a :class:`ray.data.Dataset`.

    For URIs, Ray's tasks get :func:`excb.storage.ray_filesystem` (the configured endpoint and credentials).

    Raises:
        DatasetNotFoundError: the split folder is missing or has no shards.
    """
    import ray.data

    _require_shards(uri, split)
    return ray.data.read_parquet(
        _split_uri(uri, split), file_extensions=["parquet"], filesystem=ray_filesystem(uri)
    )


@dataclass
class DecodedSplit:
    """A decoded, materialized split (columns ``image`` and ``label``) plus decode stats."""

    dataset: ray.data.Dataset
    rows: int
    corrupt: int
    corrupt_ids: list[str] = field(default_factory=list)


def _ok_rows(table: pa.Table) -> pa.Table:
    """Keep rows that decoded and drop the bookkeeping column."""
    return table.filter(table["ok"]).drop_columns(["ok"])


def _bad_ids(table: pa.Table) -> pa.Table:
    """The ``id`` column of rows that failed to decode."""
    return table.select(["id"]).filter(pc.invert(table["ok"]))


_CORRUPT_MESSAGE = re.compile(r"CorruptImageError: (.+)")


def _as_corrupt_image_error(exc: BaseException) -> CorruptImageError | None:
    """Recover a :class:`CorruptImageError` raised inside a Ray task.

    Ray Data wraps user-code failures as ``RayTaskError(UserCodeException)``
    and keeps only the formatted traceback, so the original error is found
    either in the cause chain or, failing that, in the message text.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CorruptImageError):
            return current
        seen.add(id(current))
        current = current.__cause__ or getattr(current, "cause", None)
    match = _CORRUPT_MESSAGE.search(str(exc))
    return CorruptImageError(match.group(1).strip()) if match else None


def decoded_split(
    uri: str,
    split: str,
    *,
    image_size: int,
    channels: int,
    strict: bool = False,
    limit: int | None = None,
    batch_size: int = _DECODE_BATCH_SIZE,
) -> DecodedSplit:
    """Read, decode once and materialize a split for reuse across epochs.

    Rows whose image does not decode are dropped (or, with ``strict=True``,
    :class:`~excb.data.errors.CorruptImageError` naming the row id is raised,
    unwrapped from Ray's task error). The returned dataset
    has the columns ``id`` (string), ``image`` (uint8 ``[C, S, S]`` per row)
    and ``label`` (int64, -1 for unlabelled data).

    Args:
        limit: read only the first ``limit`` rows.

    Returns:
        :class:`DecodedSplit` with ``rows`` = rows kept, ``corrupt`` = rows
        dropped and ``corrupt_ids`` = the first few dropped ids.
    """
    ds = read_split(uri, split)
    if limit is not None:
        ds = ds.limit(limit)
    decoded = ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size, "channels": channels, "strict": strict},
        batch_format="numpy",
        batch_size=batch_size,
    )
    try:
        decoded = decoded.materialize()
    except Exception as exc:
        corrupt_error = _as_corrupt_image_error(exc) if strict else None
        if corrupt_error is None or corrupt_error is exc:
            raise
        raise corrupt_error from exc
    total = decoded.count()  # from block metadata: no pass over the data

    # One cheap pass over the (in-memory) id/ok columns finds the corrupt rows.
    bad = (
        decoded.select_columns(["id", "ok"])
        .map_batches(_bad_ids, batch_format="pyarrow", batch_size=None)
        .materialize()
    )
    corrupt = bad.count()
    corrupt_ids = [str(r["id"]) for r in bad.take(_MAX_CORRUPT_IDS)] if corrupt else []

    if corrupt:
        clean = decoded.map_batches(_ok_rows, batch_format="pyarrow", batch_size=None)
    else:
        clean = decoded.drop_columns(["ok"])
    return DecodedSplit(
        dataset=clean.materialize(), rows=total - corrupt, corrupt=corrupt, corrupt_ids=corrupt_ids
    )


def load_split_arrays(
    uri: str,
    split: str,
    *,
    image_size: int,
    channels: int,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split in this process (no Ray), e.g. for evaluation.

    Rows are taken in a deterministic order (shard file name, then row);
    ``limit`` keeps the first ``limit`` rows; undecodable rows are skipped.

    Returns:
        ``(images uint8 [N, C, S, S], labels int64 [N])``; labels are -1 for
        unlabelled splits.
    """
    shards = _require_shards(uri, split)
    fs, _root = resolve_fs(uri)
    dataset = pads.dataset(shards, filesystem=fs, format="parquet")
    columns = [c for c in ("id", "image", "label") if c in dataset.schema.names]
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    remaining = limit
    for fragment in dataset.get_fragments():  # same order as `shards` (sorted)
        if remaining is not None and remaining <= 0:
            break
        table = fragment.to_table(columns=columns)
        if remaining is not None:
            table = table.slice(0, remaining)
            remaining -= table.num_rows
        batch = {name: table[name].to_numpy(zero_copy_only=False) for name in columns}
        out = decode_batch(batch, image_size=image_size, channels=channels)
        images.append(out["image"][out["ok"]])
        labels.append(out["label"][out["ok"]])
    if not images:
        return (
            np.zeros((0, channels, image_size, image_size), dtype=np.uint8),
            np.zeros(0, dtype=np.int64),
        )
    return np.concatenate(images), np.concatenate(labels)
