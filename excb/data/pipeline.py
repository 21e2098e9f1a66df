"""Decode a split of any data format into the columns the trainer consumes (``id``, ``image`` uint8 [C, S, S],
``label``): with Ray Data (materialised once or streamed) or in this process for evaluation. What differs per
format (reading, counting, in-process loading) comes from the registry :mod:`excb.data.registry`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from excb.data.errors import CorruptImageError
from excb.data.registry import RawSplit, data_format, detect_format
from excb.data.shard_reader import read_split

if TYPE_CHECKING:
    import ray.data

__all__ = ["DecodedSplit", "count_split_rows", "decoded_split", "load_split_arrays", "read_split"]

_MAX_CORRUPT_IDS = 10
_DECODE_BATCH_SIZE = 1024


@dataclass
class DecodedSplit:
    """A decoded split (columns ``id``, ``image`` and ``label``) plus decode stats: materialized (``streamed``
    False; ``rows`` and ``corrupt`` counted after decoding) or lazy (``streamed`` True: read and decoded again on
    every pass; ``rows`` counted before decoding, corrupt rows dropped on the fly and not counted)."""

    dataset: ray.data.Dataset
    rows: int
    corrupt: int
    corrupt_ids: list[str] = field(default_factory=list)
    streamed: bool = False


def _decode_clean(batch: dict[str, np.ndarray], *, decode: Any, **kwargs: Any) -> dict[str, np.ndarray]:
    """``decode`` a batch and keep only the rows that decoded (no ``ok`` column): the streaming path."""
    out = decode(batch, **kwargs)
    keep = out.pop("ok")
    return out if keep.all() else {k: v[keep] for k, v in out.items()}


def _raw_split(uri: str, split: str, fmt: str, limit: int | None, shuffle_seed: int | None) -> RawSplit:
    """The undecoded Ray dataset of a split (first ``limit`` rows, then unshuffled), its decode function and extra
    kwargs.

    Raises:
        ValueError: ``fmt`` is not a known data format.
    """
    return data_format(fmt).read_raw(uri, split, limit=limit, shuffle_seed=None if limit else shuffle_seed)


def count_split_rows(uri: str, split: str, fmt: str = "shards", *, known: int = 0, retries: int = 3) -> int:
    """Rows of a split before decoding, cheaply: Parquet footers (shards), one recursive listing (image folder),
    ``known`` if > 0 (image folder, webdataset), else one Ray Data pass over every tar (webdataset).

    Raises:
        ValueError: ``fmt`` is not a known data format.
    """
    return data_format(fmt, known_rows=known, retries=retries).count_rows(uri, split)


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
    fmt: str = "shards",
    materialize: bool = True,
    rows: int | None = None,
    shuffle_seed: int | None = None,
    fit: bool = False,
) -> DecodedSplit:
    """Read, decode once and materialize a split for reuse across epochs (or, with ``materialize=False``,
    return the lazy read + decode pipeline that runs again on every pass).

    Materialised, the data is read and decoded in one Ray Data execution and held once in the object store (no
    second copy without a bookkeeping column); ``corrupt`` = ``rows`` read (:func:`count_split_rows`, or the
    ``rows`` given) minus rows kept, and only when that is positive does a second pass find the corrupt rows' ids.

    Rows whose image does not decode are dropped (or, with ``strict=True``,
    :class:`~excb.data.errors.CorruptImageError` naming the row id is raised,
    unwrapped from Ray's task error). The returned dataset
    has the columns ``id`` (string), ``image`` (uint8 ``[C, S, S]`` per row)
    and ``label`` (int64, -1 for unlabelled data).

    Args:
        limit: read only the first ``limit`` rows (image folders: of the class-interleaved listing).
        fmt: ``shards``, ``image_folder`` or ``webdataset`` (see :mod:`excb.data.registry`).
        materialize: False streams: decoding happens in Ray Data's CPU tasks on every pass.
        rows: the split's row count before decoding (default: :func:`count_split_rows`, capped at ``limit``).
            Streamed, it is the epoch's row count; materialised, what the kept rows are compared with to count the
            corrupt ones (a ``rows`` below the true count hides corrupt rows from the count, never from the
            filter).
        shuffle_seed: shuffle the file order, anew on every pass (streaming without ``limit``; materialized
            datasets are shuffled by block order instead).
        fit: whole images in padded canvases with their ``valid_hw`` (training with ``data.train_decode=fit``)
            instead of centre crops.

    Returns:
        :class:`DecodedSplit` with ``rows`` = rows kept, ``corrupt`` = rows
        dropped and ``corrupt_ids`` = the first few dropped ids.
    """
    fn_kwargs = {"image_size": image_size, "channels": channels, "strict": strict, "fit": fit}
    if not materialize:
        if rows is None:
            rows = count_split_rows(uri, split, fmt)
            rows = min(rows, limit) if limit else rows
        ds, decode, extra = _raw_split(uri, split, fmt, limit, shuffle_seed)
        streamed = ds.map_batches(_decode_clean, fn_kwargs={"decode": decode, **extra, **fn_kwargs},
                                  batch_format="numpy", batch_size=batch_size)
        return DecodedSplit(dataset=streamed, rows=rows, corrupt=0, streamed=True)
    ds, decode, extra = _raw_split(uri, split, fmt, limit, None)
    clean = ds.map_batches(_decode_clean, fn_kwargs={"decode": decode, **extra, **fn_kwargs},
                           batch_format="numpy", batch_size=batch_size)
    try:
        clean = clean.materialize()  # the one pass over the data
    except Exception as exc:
        corrupt_error = _as_corrupt_image_error(exc) if strict else None
        if corrupt_error is None or corrupt_error is exc:
            raise
        raise corrupt_error from exc
    kept = clean.count()  # from block metadata: no pass over the data
    if rows is None:
        rows = count_split_rows(uri, split, fmt)
        rows = min(rows, limit) if limit else rows
    corrupt, corrupt_ids = (0, []) if kept >= rows else _find_corrupt(uri, split, fmt, limit, fn_kwargs, batch_size)
    return DecodedSplit(dataset=clean, rows=kept, corrupt=corrupt, corrupt_ids=corrupt_ids)


def _find_corrupt(uri: str, split: str, fmt: str, limit: int | None, fn_kwargs: dict[str, Any],
                  batch_size: int) -> tuple[int, list[str]]:
    """How many rows of a split do not decode, and the first few of their ids: a second decoding pass, run only
    when fewer rows decoded than were read (rare, and only for splits small enough to materialize)."""
    ds, decode, extra = _raw_split(uri, split, fmt, limit, None)
    bad = (
        ds.map_batches(decode, fn_kwargs={**extra, **fn_kwargs}, batch_format="numpy", batch_size=batch_size)
        .select_columns(["id", "ok"])
        .map_batches(_bad_ids, batch_format="pyarrow", batch_size=None)
        .materialize()
    )
    corrupt = bad.count()
    return corrupt, [str(r["id"]) for r in bad.take(_MAX_CORRUPT_IDS)] if corrupt else []


def load_split_arrays(
    uri: str,
    split: str,
    *,
    image_size: int,
    channels: int,
    limit: int | None = None,
    fmt: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split in this process (no Ray), e.g. for evaluation.

    Rows are taken in a deterministic order (shards: shard file name, then row; image folders: classes
    interleaved; tars: file name, then member order); ``limit`` keeps the first ``limit`` rows; undecodable rows
    are skipped. ``fmt`` (shards | image_folder | webdataset) defaults to what is found at ``uri``
    (:func:`excb.data.registry.detect_format`), so evaluation needs no format argument.

    Returns:
        ``(images uint8 [N, C, S, S], labels int64 [N])``; labels are -1 for
        unlabelled splits.

    Raises:
        ValueError: ``fmt`` is not a known data format.
    """
    fmt = fmt or detect_format(uri, split)
    return data_format(fmt).load_arrays(uri, split, image_size=image_size, channels=channels, limit=limit)
