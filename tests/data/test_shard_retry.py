"""verify_shards: footer reads retried with backoff, unreadable shards reported by name (local, flaky, S3)."""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from excb.data import ShardReadError, list_shards, verify_shards, write_split

ROWS = 10
ROWS_PER_SHARD = 4  # 3 shards: 4 + 4 + 2 rows


class FlakyHandler(pafs.FileSystemHandler):
    """A local filesystem whose first ``failures`` opens of ``target`` raise OSError; counts every open."""

    def __init__(self, target: str, failures: int) -> None:
        self.fs = pafs.LocalFileSystem()
        self.target = target
        self.failures = failures
        self.opens: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, path: str) -> None:
        with self._lock:
            self.opens[path] += 1
            n = self.opens[path]
        if path == self.target and n <= self.failures:
            raise OSError(f"injected failure {n} for {path}")

    def open_input_file(self, path: str) -> pafs.NativeFile:
        self._count(path)
        return self.fs.open_input_file(path)

    def open_input_stream(self, path: str) -> pafs.NativeFile:
        self._count(path)
        return self.fs.open_input_stream(path)

    # plain delegation to LocalFileSystem
    def get_type_name(self) -> str:
        return "flaky-local"

    def equals(self, other: pafs.FileSystemHandler) -> bool:
        return other is self

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("not supported")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pafs.NativeFile:
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str] | None) -> pafs.NativeFile:
        return self.fs.open_append_stream(path, metadata=metadata)

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)


def _write(dest: str) -> list[str]:
    """Write a 10-row labelled train split (image bytes need not decode for footer reads); return shard paths."""
    rows = ((f"r{i}", b"not decoded here", i % 3) for i in range(ROWS))
    assert write_split(rows, dest, "train", rows_per_shard=ROWS_PER_SHARD) == ROWS
    shards = list_shards(dest, "train")
    assert len(shards) == 3
    return shards


def test_counts_rows(tmp_path: Path) -> None:
    _write(str(tmp_path))
    assert verify_shards(str(tmp_path), "train") == ROWS
    assert verify_shards(str(tmp_path), "missing-split") == 0
    with pytest.raises(ValueError, match="retries"):
        verify_shards(str(tmp_path), "train", retries=0)


def test_transient_failure_is_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards = _write(str(tmp_path))
    handler = FlakyHandler(shards[1], failures=2)
    caplog.set_level(logging.WARNING, logger="excb.data.shards")
    rows = verify_shards(str(tmp_path), "train", retries=3, backoff_s=0.0, filesystem=pafs.PyFileSystem(handler))
    assert rows == ROWS
    assert handler.opens[shards[1]] == 3 and handler.opens[shards[0]] == handler.opens[shards[2]] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(shards[1] in w and "injected failure" in w for w in warnings)
    assert "attempt 1/3" in warnings[0] and "attempt 2/3" in warnings[1]


def test_persistent_failure_names_shard_and_last_error(tmp_path: Path) -> None:
    shards = _write(str(tmp_path))
    handler = FlakyHandler(shards[2], failures=10)
    with pytest.raises(ShardReadError) as info:
        verify_shards(str(tmp_path), "train", retries=3, backoff_s=0.0, filesystem=pafs.PyFileSystem(handler))
    assert handler.opens[shards[2]] == 3
    message = str(info.value)
    assert message.startswith(f"cannot read shard {shards[2]} after 3 attempts: ")
    assert f"injected failure 3 for {shards[2]}" in message


def test_garbage_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(str(tmp_path))
    bad = tmp_path / "train" / "part-00003.parquet"
    bad.write_bytes(b"these are not parquet bytes at all")
    caplog.set_level(logging.WARNING, logger="excb.data.shards")
    with pytest.raises(ShardReadError, match=rf"^cannot read shard {re.escape(str(bad))} after 2 attempts: ArrowInvalid: "):
        verify_shards(str(tmp_path), "train", retries=2, backoff_s=0.0)
    assert [str(bad) in r.getMessage() for r in caplog.records] == [True]  # one retry warning
    handler = FlakyHandler(str(bad), failures=0)
    with pytest.raises(ShardReadError):
        verify_shards(str(tmp_path), "train", retries=4, backoff_s=0.0, filesystem=pafs.PyFileSystem(handler))
    assert handler.opens[str(bad)] == 4


def test_on_s3(s3_bucket: str) -> None:
    import boto3

    dest = f"{s3_bucket}/ds"
    _write(dest)
    assert verify_shards(dest, "train", backoff_s=0.0) == ROWS
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3").put_object(Bucket=bucket, Key="ds/train/part-00007.parquet", Body=b"garbage")
    with pytest.raises(ShardReadError, match=rf"^cannot read shard {re.escape(dest)}/train/part-00007\.parquet after 2 attempts"):
        verify_shards(dest, "train", retries=2, backoff_s=0.0)
