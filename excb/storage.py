"""Local paths and object-storage URIs (s3://, gs://) behind one pyarrow filesystem API; atomic writes."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or a URI with a scheme.

    Plain paths use :class:`pyarrow.fs.LocalFileSystem` (made absolute); ``s3://``, ``gs://``, ``file://`` …
    go through :meth:`pyarrow.fs.FileSystem.from_uri` (endpoint and credentials from the environment).
    """
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path components onto a local path or URI with ``/``."""
    return posixpath.join(uri.rstrip("/"), *parts) if "://" in uri else os.path.join(uri, *parts)


def absolute(uri: str) -> str:
    """A URI unchanged, a local path made absolute (Ray needs absolute storage paths)."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{uuid.uuid4().hex}"


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def atomic_write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and a move, so readers never see a partial file."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = _tmp_name(path)
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        delete_quietly(fs, tmp)
        raise


def atomic_write_table(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write a Parquet file to ``path`` via a temporary sibling and a move."""
    tmp = _tmp_name(path)
    try:
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)
    except BaseException:
        delete_quietly(fs, tmp)
        raise


def write_text(uri: str, text: str) -> None:
    """Atomically write a text file at a local path or URI."""
    fs, path = resolve_fs(uri)
    atomic_write_bytes(fs, path, text.encode())


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_text(uri: str) -> str:
    fs, path = resolve_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def exists(uri: str) -> bool:
    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound
