"""The prepared shard format: Parquet shards plus ``meta.json`` — schema, writing, meta, listing and checks.

Layout of a prepared dataset at ``DEST`` (a local path or an ``s3://`` /
``gs://`` URI)::

    DEST/meta.json
    DEST/train/part-00000.parquet
    DEST/train/part-00001.parquet
    DEST/test/part-00000.parquet

Each shard has the columns ``id`` (string), ``image`` (binary: the encoded
PNG/JPEG bytes) and, only when the split is labelled, ``label`` (int64).
All files are written atomically: to ``<name>.tmp-<uuid>`` first, then moved
into place, so readers never see half-written files.

Turning raw data into shards is :mod:`excb.data.prepare`; reading shards is :mod:`excb.data.shard_reader`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from excb.data.errors import DatasetNotFoundError, ShardReadError
from excb.storage import atomic_write_bytes as _atomic_write_bytes
from excb.storage import atomic_write_table as _atomic_write_table
from excb.storage import join as _join
from excb.storage import resolve_fs

__all__ = [
    "FORMAT",
    "META_FILE",
    "list_shards",
    "read_meta",
    "resolve_fs",
    "shard_schema",
    "shards_exist",
    "verify_shards",
    "write_meta",
    "write_split",
]

log = logging.getLogger(__name__)

FORMAT = "excb-shards-v1"
META_FILE = "meta.json"
_SHARD_PREFIX = "part-"
_SHARD_SUFFIX = ".parquet"
_READ_THREADS = 16  # parallel footer reads in verify_shards


def list_shards(uri: str, split: str) -> list[str]:
    """Sorted filesystem paths of the Parquet shards of ``split`` (empty if none)."""
    fs, root = resolve_fs(uri)
    return _list_shards(fs, root, split)


def _list_shards(fs: pafs.FileSystem, root: str, split: str) -> list[str]:
    """Sorted paths of the Parquet shards in ``root/split`` on ``fs`` (empty if none)."""
    folder = posixpath.join(root, split)
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.startswith(_SHARD_PREFIX)
        and i.base_name.endswith(_SHARD_SUFFIX)
    )


def _read_rows(fs: pafs.FileSystem, path: str, name: str, retries: int, backoff_s: float) -> int:
    """Row count from the Parquet footer of one shard, retried with exponential backoff.

    Raises:
        ShardReadError: every one of the ``retries`` attempts failed; names ``name`` and the last error.
    """
    for attempt in range(1, retries + 1):
        try:
            return pq.read_metadata(path, filesystem=fs).num_rows
        except (OSError, pa.ArrowException) as exc:
            if attempt == retries:
                raise ShardReadError(
                    f"cannot read shard {name} after {retries} attempt{'s' if retries > 1 else ''}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "reading shard %s failed (attempt %d/%d: %s); retrying in %.2f s", name, attempt, retries, exc, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def verify_shards(
    uri: str,
    split: str,
    retries: int = 3,
    backoff_s: float = 0.2,
    *,
    filesystem: pafs.FileSystem | None = None,
) -> int:
    """Read the Parquet footer of every shard of ``split`` (in threads) and return the total row count.

    Each failed read is retried up to ``retries`` attempts in all, sleeping ``backoff_s``, ``2 * backoff_s``,
    ... in between and logging a warning per retry. A split without shards counts 0 rows.

    Args:
        filesystem: read ``uri`` as a path on this filesystem instead of resolving it with
            :func:`excb.storage.resolve_fs`.

    Raises:
        ShardReadError: a shard still fails after ``retries`` attempts; the message names its full path/URI.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    fs, root = (filesystem, uri.rstrip("/")) if filesystem is not None else resolve_fs(uri)
    shards = _list_shards(fs, root, split)
    scheme = uri.split("://", 1)[0] + "://" if filesystem is None and "://" in uri else ""
    if not shards:
        return 0
    pool = ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(shards)))
    try:
        counts = list(pool.map(lambda p: _read_rows(fs, p, scheme + p, retries, backoff_s), shards))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return sum(counts)


def shard_schema(labelled: bool) -> pa.Schema:
    """The Arrow schema of a shard: ``id``, ``image`` and, if labelled, ``label``."""
    fields = [pa.field("id", pa.string()), pa.field("image", pa.binary())]
    if labelled:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields)


def write_split(
    rows: Iterable[tuple[str, bytes, int | None]],
    dest: str,
    split: str,
    rows_per_shard: int = 10000,
) -> int:
    """Stream ``(id, encoded_image, label_or_None)`` rows into ``dest/split`` shards.

    Existing shards of the split are removed first. Either every row has a
    label or none has (then the ``label`` column is omitted).

    Returns:
        The number of rows written.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    fs, root = resolve_fs(dest)
    folder = posixpath.join(root, split)
    fs.create_dir(folder, recursive=True)
    for old in list_shards(dest, split):
        fs.delete_file(old)

    labelled: bool | None = None
    ids: list[str] = []
    images: list[bytes] = []
    labels: list[int] = []
    total = 0
    shard_index = 0

    def flush() -> None:
        """Write the buffered rows as the next shard and empty the buffers."""
        nonlocal shard_index, ids, images, labels
        columns: list[pa.Array] = [pa.array(ids, pa.string()), pa.array(images, pa.binary())]
        if labelled:
            columns.append(pa.array(labels, pa.int64()))
        table = pa.Table.from_arrays(columns, schema=shard_schema(bool(labelled)))
        name = f"{_SHARD_PREFIX}{shard_index:05d}{_SHARD_SUFFIX}"
        _atomic_write_table(fs, posixpath.join(folder, name), table)
        shard_index += 1
        ids, images, labels = [], [], []

    for row_id, data, label in rows:
        has_label = label is not None
        if labelled is None:
            labelled = has_label
        elif labelled != has_label:
            raise ValueError(
                f"split {split!r}: row {row_id!r} {'has' if has_label else 'lacks'} a label "
                "but earlier rows do not; a split must be all labelled or all unlabelled"
            )
        ids.append(str(row_id))
        images.append(bytes(data))
        if has_label:
            labels.append(int(label))  # type: ignore[arg-type]
        total += 1
        if len(ids) >= rows_per_shard:
            flush()
    if ids:
        flush()
    return total


def write_meta(dest: str, meta: dict[str, Any]) -> None:
    """Atomically write ``dest/meta.json``."""
    fs, root = resolve_fs(dest)
    data = json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n"
    _atomic_write_bytes(fs, posixpath.join(root, META_FILE), data)


def read_meta(dest: str) -> dict[str, Any]:
    """Read ``dest/meta.json``.

    Raises:
        DatasetNotFoundError: the file does not exist.
    """
    fs, root = resolve_fs(dest)
    path = posixpath.join(root, META_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise DatasetNotFoundError(
            f"no prepared dataset at {dest!r}: {_join(dest, META_FILE)} does not exist. "
            "Create it first with `excb prepare` (e.g. `excb prepare fashion-mnist --dest "
            f"{dest}`)."
        )
    with fs.open_input_stream(path) as f:
        meta = json.loads(f.read().decode())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{_join(dest, META_FILE)}: unsupported format {meta.get('format')!r}, "
            f"expected {FORMAT!r}; re-run `excb prepare`"
        )
    return meta


def shards_exist(dest: str) -> bool:
    """True if ``dest`` has a ``meta.json`` and shards for every split it lists."""
    try:
        meta = read_meta(dest)
    except (DatasetNotFoundError, ValueError, OSError):
        return False
    splits = meta.get("splits") or {}
    return bool(splits) and all(
        n == 0 or list_shards(dest, split) for split, n in splits.items()
    )
