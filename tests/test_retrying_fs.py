"""The data filesystem's retries against a real S3 server behind a forwarder that a test takes down: a short
outage is waited out, a long one stops naming the object, a missing key fails at once."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import boto3
import pyarrow.fs as pafs
import pytest
from testkit.proxy import TcpProxy

import excb.storage
from excb.config import StorageConfig
from excb.retrying_fs import RetryingHandler, is_transient
from excb.storage import data_filesystem


@pytest.fixture()
def proxied(s3_bucket: str, s3_endpoint: str) -> Iterator[tuple[str, TcpProxy]]:
    """``s3_bucket`` with one object, read through a :class:`TcpProxy` (storage.read_retries=3)."""
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3").put_object(Bucket=bucket, Key="fm/train/part-00000.parquet", Body=b"x" * 1000)
    target = urlsplit(s3_endpoint)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 80)
    excb.storage.configure(StorageConfig(endpoint_url=proxy.url, read_retries=3, connect_timeout_s=2,
                                         request_timeout_s=5))
    try:
        yield bucket, proxy
    finally:
        proxy.close()
        excb.storage.configure(None)
        excb.storage.clear_cache()


def test_reads_through_the_wrapper(proxied: tuple[str, TcpProxy]) -> None:
    bucket, _proxy = proxied
    fs = data_filesystem(f"s3://{bucket}/fm")
    assert isinstance(fs, pafs.PyFileSystem) and fs.unwrap().type_name == "s3"  # what Ray Data's checks see
    infos = fs.get_file_info(pafs.FileSelector(f"{bucket}/fm", recursive=True))
    assert [i.base_name for i in infos if i.type == pafs.FileType.File] == ["part-00000.parquet"]
    with fs.open_input_stream(f"{bucket}/fm/train/part-00000.parquet") as f:
        assert f.read() == b"x" * 1000
    again = pickle.loads(pickle.dumps(fs))  # Ray ships it to its read tasks
    assert again.get_file_info(f"{bucket}/fm/train/part-00000.parquet").size == 1000
    assert data_filesystem("/local/path") is None


def test_a_short_outage_is_waited_out(proxied: tuple[str, TcpProxy]) -> None:
    bucket, proxy = proxied
    fs = data_filesystem(f"s3://{bucket}/fm")
    proxy.down()
    threading.Timer(1.5, proxy.up).start()  # back before the third try (waits of ~1 s and ~2 s)
    t0 = time.monotonic()
    with fs.open_input_stream(f"{bucket}/fm/train/part-00000.parquet") as f:
        assert len(f.read()) == 1000
    assert time.monotonic() - t0 >= 1.0


def test_a_long_outage_stops_naming_the_object(proxied: tuple[str, TcpProxy]) -> None:
    bucket, proxy = proxied
    fs = data_filesystem(f"s3://{bucket}/fm")
    proxy.down()
    t0 = time.monotonic()
    named = rf"unreachable: could not open input stream for s3://{bucket}/fm/train/part-00000\.parquet after 3 tries"
    with pytest.raises(OSError, match=named) as err:
        fs.open_input_stream(f"{bucket}/fm/train/part-00000.parquet")
    assert time.monotonic() - t0 >= 2.4  # waited ~1 s and ~2 s (±20 %) between the tries
    assert "AWS Error" not in str(err.value)  # so Ray Data does not retry it 10 more times on top
    assert not is_transient(err.value)


def test_a_missing_key_is_not_retried(proxied: tuple[str, TcpProxy]) -> None:
    bucket, _proxy = proxied
    fs = data_filesystem(f"s3://{bucket}/fm")
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{bucket}/fm/train/missing.parquet")
    assert time.monotonic() - t0 < 1.0


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryingHandler(pafs.LocalFileSystem(), attempts=0)
