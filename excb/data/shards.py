"""Write and describe image shard datasets (Parquet files + ``meta.json``).

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
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from excb.data.decode import chunks
from excb.data.errors import DatasetNotFoundError, ShardReadError
from excb.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from excb.data.fashion_mnist import load_fashion_mnist
from excb.storage import atomic_write_bytes as _atomic_write_bytes
from excb.storage import atomic_write_table as _atomic_write_table
from excb.storage import join as _join
from excb.storage import resolve_fs

__all__ = [
    "FORMAT",
    "IMAGE_EXTENSIONS",
    "META_FILE",
    "list_shards",
    "prepare_fashion_mnist",
    "prepare_image_folder",
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
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_SHARD_PREFIX = "part-"
_SHARD_SUFFIX = ".parquet"
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_PROBE_IMAGES = 8
_READ_THREADS = 16


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


# --------------------------------------------------------------------------- shards


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


# --------------------------------------------------------------------------- Fashion-MNIST


def _encode_png(pixels: np.ndarray) -> bytes:
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


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_split(fs: pafs.FileSystem, folder: str) -> tuple[list[str], dict[str, list[str]]]:
    """Return (images directly in ``folder``, {class: sorted image paths}) for one split."""
    return group_images(fs.get_file_info(pafs.FileSelector(folder, recursive=True)), folder)


def group_images(infos: Iterable[pafs.FileInfo], folder: str) -> tuple[list[str], dict[str, list[str]]]:
    """From a recursive listing of ``folder``: (sorted images directly in it, {class folder: sorted image
    paths}) — the first path component below ``folder`` names the class."""
    flat: list[str] = []
    by_class: dict[str, list[str]] = {}
    prefix = folder.rstrip("/") + "/"
    for info in infos:
        if info.type != pafs.FileType.File or not _is_image(info.base_name):
            continue
        rel = info.path[len(prefix) :] if info.path.startswith(prefix) else info.base_name
        if "/" in rel:
            by_class.setdefault(rel.split("/", 1)[0], []).append(info.path)
        else:
            flat.append(info.path)
    return sorted(flat), {c: sorted(p) for c, p in sorted(by_class.items())}


def _interleave(by_class: dict[str, list[str]]) -> Iterator[tuple[str, str]]:
    """Yield ``(class, path)`` round-robin over classes, so any prefix is balanced."""
    lists = list(by_class.items())
    longest = max((len(p) for _, p in lists), default=0)
    for i in range(longest):
        for cls, paths in lists:
            if i < len(paths):
                yield cls, paths[i]


def _read_files(fs: pafs.FileSystem, paths: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(path, bytes)`` in order, reading with a small thread pool (for object stores)."""

    def read(path: str) -> tuple[str, bytes]:
        with fs.open_input_stream(path) as f:
            return path, f.read()

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        for chunk in chunks(paths, 256):
            yield from pool.map(read, chunk)


def _probe_channels(fs: pafs.FileSystem, paths: list[str]) -> int:
    """1 if every probed image that opens is grayscale (and at least one does), else 3."""
    modes: list[str] = []
    for _path, data in _read_files(fs, paths):
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
    * Extensions: .jpg .jpeg .png .bmp .webp (any case). Bytes are kept as
      they are (no re-encoding); ids are paths relative to ``src``.

    Args:
        limit: keep at most this many images per split (classes interleaved).
    """
    fs, root = resolve_fs(src)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DatasetNotFoundError(f"image folder {src!r} does not exist or is not a directory")

    def is_dir(name: str) -> bool:
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
            items: list[tuple[str, int | None]] = [(p, index[c]) for c, p in _interleave(by_class)]
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
            for path, data in _read_files(fs, (p for p, _ in items))
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
