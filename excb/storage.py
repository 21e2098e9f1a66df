"""Local paths and object-storage URIs (s3://, gs://) behind one pyarrow filesystem API; atomic writes.

``s3://`` filesystems are built explicitly (endpoint, region, credentials and timeouts from :func:`configure`
or the standard AWS environment variables) and cached; ``gs://`` goes through
:meth:`pyarrow.fs.FileSystem.from_uri` (credentials from ``GOOGLE_APPLICATION_CREDENTIALS`` etc.).
Credentials are never logged nor put into error messages.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import posixpath
import threading
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from excb.config import StorageConfig

__all__ = [
    "StorageError",
    "absolute",
    "atomic_write_bytes",
    "atomic_write_table",
    "check_reachable",
    "clear_cache",
    "configure",
    "data_filesystem",
    "delete_quietly",
    "exists",
    "join",
    "ray_filesystem",
    "read_text",
    "resolve_fs",
    "write_json",
    "write_text",
]

REDACTED = "***"  # the marker written for credentials in saved configs
_DEFAULT_CONNECT_TIMEOUT_S = 10.0
_DEFAULT_REQUEST_TIMEOUT_S = 60.0

_options: StorageConfig | None = None
_cache: dict[tuple[Any, ...], pafs.FileSystem] = {}
_lock = threading.Lock()


class StorageError(RuntimeError):
    """Object storage is unreachable, a bucket is missing or access is denied.

    The message names the URI (and endpoint), never credentials.
    """


def _clean(value: str) -> str:
    """An option value with the redaction marker treated as unset."""
    return "" if value == REDACTED else value


def configure(options: StorageConfig | None) -> None:
    """Set the object-storage options :func:`resolve_fs` uses for ``s3://`` URIs (``None``: environment only).

    String values ``""`` and ``"***"`` (the redaction marker of saved configs) mean unset. Clears the cache.
    """
    global _options
    if options is not None:
        options = dataclasses.replace(
            options,
            **{f.name: _clean(getattr(options, f.name)) for f in dataclasses.fields(options) if f.type in ("str", str)},
        )
    with _lock:
        _options = options
    clear_cache()


def clear_cache() -> None:
    """Forget cached filesystems and bucket regions (e.g. after the AWS environment variables changed)."""
    with _lock:
        _cache.clear()
    _bucket_region.cache_clear()


def _endpoint_url() -> str:
    """The S3 endpoint URL from the options or the environment; ``""`` for AWS's default endpoint."""
    if _options is not None and _options.endpoint_url:
        return _options.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    """The AWS region of ``bucket`` (as ``FileSystem.from_uri`` resolves it), ``None`` if that fails."""
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):
        return None


def _s3_kwargs(bucket: str) -> dict[str, Any]:
    """Keyword arguments for :class:`pyarrow.fs.S3FileSystem` from the options and the environment."""
    opts = _options
    kwargs: dict[str, Any] = {
        "connect_timeout": opts.connect_timeout_s if opts else _DEFAULT_CONNECT_TIMEOUT_S,
        "request_timeout": opts.request_timeout_s if opts else _DEFAULT_REQUEST_TIMEOUT_S,
    }
    endpoint = _endpoint_url()
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme in ("http", "https") and parts.netloc:
            kwargs["scheme"] = parts.scheme
            kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        else:
            kwargs["endpoint_override"] = endpoint
    region = (opts.region if opts else "") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if not region and not endpoint:
        region = _bucket_region(bucket)
    if region:
        kwargs["region"] = region
    if opts is not None and opts.access_key_id and opts.secret_access_key:
        kwargs["access_key"] = opts.access_key_id
        kwargs["secret_key"] = opts.secret_access_key
    return kwargs


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    """The cached S3 filesystem for the current options and environment endpoint."""
    kwargs = _s3_kwargs(bucket)
    key = tuple(sorted(kwargs.items()))
    with _lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _cache[key] = pafs.S3FileSystem(**kwargs)
    return fs


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or a URI with a scheme.

    ``s3://bucket/key`` gives a cached :class:`pyarrow.fs.S3FileSystem` (see :func:`configure`) and
    ``bucket/key``; other schemes (``gs://``, ``file://`` …) go through :meth:`pyarrow.fs.FileSystem.from_uri`;
    plain paths use :class:`pyarrow.fs.LocalFileSystem` (made absolute). Paths have no trailing slash.
    """
    if "://" in uri:
        parts = urlsplit(uri)
        if parts.scheme == "s3" and not parts.query:
            return _s3_filesystem(parts.netloc), (parts.netloc + parts.path).rstrip("/")
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def ray_filesystem(uri: str) -> pafs.FileSystem | None:
    """The (picklable) filesystem to hand to Ray for ``uri``, ``None`` for local paths.

    For ``ray.data.read_parquet(filesystem=...)`` and ``ray.train.RunConfig(storage_filesystem=...)``, so Ray's
    worker processes use the configured endpoint and credentials.
    """
    return resolve_fs(uri)[0] if "://" in uri else None


def data_filesystem(uri: str) -> pafs.FileSystem | None:
    """The filesystem Ray Data reads training data with: :func:`ray_filesystem` for object storage, behind
    :class:`excb.retrying_fs.RetryingHandler` with ``storage.read_retries`` tries per call (a short outage is
    waited out; a longer one stops the run naming the object); ``None`` for local paths."""
    if "://" not in uri:
        return None
    from excb.retrying_fs import retrying

    attempts = _options.read_retries if _options is not None else 3
    return retrying(resolve_fs(uri)[0], attempts, scheme=urlsplit(uri).scheme)


def _scrub(message: str) -> str:
    """``message`` with any known credential replaced by the redaction marker."""
    secrets = [os.environ.get("AWS_SECRET_ACCESS_KEY", ""), os.environ.get("AWS_SESSION_TOKEN", "")]
    if _options is not None:
        secrets += [_options.access_key_id, _options.secret_access_key]
    for secret in secrets:
        if len(secret) >= 8:  # shorter values are placeholders; replacing them would garble the message
            message = message.replace(secret, REDACTED)
    return message


def _describe_failure(error: OSError, endpoint: str, timeout_s: float) -> str:
    """A short reason for a failed bucket check, from pyarrow's (AWS SDK / curl) error text."""
    text = str(error)
    if any(code in text for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")):
        return "access denied (check the credentials and the bucket policy)"
    if "curlCode: 7," in text or "Could not connect" in text or "Connection refused" in text:
        return f"endpoint {endpoint} refused the connection"
    if "curlCode: 28," in text or "Timeout" in text or "timed out" in text:
        return f"endpoint {endpoint} did not answer within {timeout_s:g} s"
    if "curlCode: 6," in text or "resolve host" in text:
        return f"endpoint {endpoint}: host not found"
    return f"endpoint {endpoint}: {text}"


def check_reachable(uri: str, what: str) -> None:
    """Check quickly that the endpoint of an ``s3://`` / ``gs://`` URI answers and its bucket exists.

    Tries once (no retries), so it returns within about the connect timeout. Local paths and other schemes
    are not checked.

    Raises:
        StorageError: ``cannot reach {what} {uri}: <reason>`` (bucket missing, connection refused, access
            denied, ...).
    """
    parts = urlsplit(uri) if "://" in uri else None
    if parts is None or parts.scheme not in ("s3", "gs", "gcs"):
        return
    bucket = parts.netloc
    timeout_s = _options.connect_timeout_s if _options else _DEFAULT_CONNECT_TIMEOUT_S
    fs: pafs.FileSystem
    if parts.scheme == "s3":
        kwargs = _s3_kwargs(bucket)
        fs = pafs.S3FileSystem(**kwargs, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        endpoint = _endpoint_url() or "AWS S3"
    else:
        fs = pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=timeout_s))
        endpoint = "Google Cloud Storage"
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise StorageError(_scrub(f"cannot reach {what} {uri}: {_describe_failure(exc, endpoint, timeout_s)}")) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"cannot reach {what} {uri}: bucket {bucket!r} does not exist")


def join(uri: str, *parts: str) -> str:
    """Join path components onto a local path or URI with ``/``."""
    return posixpath.join(uri.rstrip("/"), *parts) if "://" in uri else os.path.join(uri, *parts)


def absolute(uri: str) -> str:
    """A URI unchanged, a local path made absolute (Ray needs absolute storage paths)."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{uuid.uuid4().hex}"


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Delete ``path`` if it exists; errors are ignored."""
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
    """Atomically write ``obj`` as indented, key-sorted JSON at a local path or URI."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_text(uri: str) -> str:
    """Read a text file from a local path or URI."""
    fs, path = resolve_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def exists(uri: str) -> bool:
    """True if a file or folder exists at the local path or URI."""
    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound
