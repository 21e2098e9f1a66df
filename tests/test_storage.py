"""excb.storage against a real S3 API (moto server subprocess) through pyarrow's S3FileSystem."""

from __future__ import annotations

import logging
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from excb import storage
from excb.config import StorageConfig

SECRET = "s3cr3t-Do-Not-Print-0123456789"
AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A local port that is bound but not listening, so connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _config_only(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Remove the AWS environment and configure endpoint and credentials through StorageConfig."""
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    storage.configure(
        StorageConfig(endpoint_url=endpoint, region="us-east-1", access_key_id="test", secret_access_key=SECRET)
    )


def _roundtrip(root: str) -> None:
    """Write and read back text, JSON, bytes and a Parquet table under ``root`` with excb.storage."""
    assert not storage.exists(storage.join(root, "a", "b.txt"))
    storage.write_text(storage.join(root, "a", "b.txt"), "hello")
    assert storage.exists(storage.join(root, "a", "b.txt"))
    assert storage.exists(storage.join(root, "a"))
    assert storage.read_text(storage.join(root, "a", "b.txt")) == "hello"
    storage.write_json(storage.join(root, "c.json"), {"k": [1, 2]})
    assert storage.read_text(storage.join(root, "c.json")) == '{\n  "k": [\n    1,\n    2\n  ]\n}\n'

    fs, path = storage.resolve_fs(root + "/")
    assert isinstance(fs, pafs.S3FileSystem) and path == root.removeprefix("s3://")
    storage.atomic_write_bytes(fs, f"{path}/d/e.bin", b"\x00\x01")
    table = pa.table({"x": [1, 2, 3]})
    storage.atomic_write_table(fs, f"{path}/t.parquet", table)
    assert pq.read_table(f"{path}/t.parquet", filesystem=fs).equals(table)
    with fs.open_input_stream(f"{path}/d/e.bin") as f:
        assert f.read() == b"\x00\x01"
    names = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file)
    assert names == [f"{path}/{n}" for n in ("a/b.txt", "c.json", "d/e.bin", "t.parquet")]  # no temporaries left


def test_config_path(s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _config_only(monkeypatch, s3_endpoint)
    _roundtrip(f"{s3_bucket}/cfg")
    storage.write_text(f"{s3_bucket}/top.txt", "bucket root")  # a file directly in the bucket
    assert storage.read_text(f"{s3_bucket}/top.txt") == "bucket root"


def test_env_path(s3_bucket: str) -> None:
    _roundtrip(f"{s3_bucket}/env")
    assert storage.resolve_fs(s3_bucket)[0] is storage.resolve_fs(f"{s3_bucket}/x")[0]  # cached


def test_env_s3_endpoint_wins_and_redacted_options_are_unset(
    s3_bucket: str, s3_endpoint: str, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    # values read back from a saved (redacted) config fall back to the environment
    storage.configure(StorageConfig(endpoint_url="***", access_key_id="***", secret_access_key="***"))
    storage.write_text(f"{s3_bucket}/x.txt", "via AWS_ENDPOINT_URL_S3")
    assert storage.read_text(f"{s3_bucket}/x.txt") == "via AWS_ENDPOINT_URL_S3"


def test_check_reachable(s3_bucket: str, tmp_path: Path) -> None:
    storage.check_reachable(f"{s3_bucket}/data", "dataset")
    storage.check_reachable(str(tmp_path / "not-there"), "dataset")  # local paths are not checked
    missing = f"{s3_bucket}-missing"
    with pytest.raises(storage.StorageError) as info:
        storage.check_reachable(f"{missing}/data", "dataset")
    assert str(info.value) == (
        f"cannot reach dataset {missing}/data: bucket '{missing.removeprefix('s3://')}' does not exist"
    )


def test_check_reachable_closed_port(s3_bucket: str, closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    _config_only(monkeypatch, endpoint)
    with pytest.raises(storage.StorageError) as info:
        storage.check_reachable(f"{s3_bucket}/runs", "storage path")
    assert str(info.value) == f"cannot reach storage path {s3_bucket}/runs: endpoint {endpoint} refused the connection"


def test_check_reachable_access_denied(s3_auth_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _config_only(monkeypatch, s3_auth_endpoint)
    with pytest.raises(storage.StorageError, match=r"^cannot reach dataset s3://some-bucket/x: access denied"):
        storage.check_reachable("s3://some-bucket/x", "dataset")


def test_secret_never_shown(
    s3_bucket: str,
    s3_endpoint: str,
    s3_auth_endpoint: str,
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    messages = []
    for endpoint in (s3_endpoint, s3_auth_endpoint, f"http://127.0.0.1:{closed_port}"):
        _config_only(monkeypatch, endpoint)
        try:  # succeeds on the first endpoint, fails on the others
            storage.write_text(f"{s3_bucket}/s.txt", "x")
        except OSError as exc:
            messages.append(str(exc))
        with pytest.raises(storage.StorageError) as info:
            storage.check_reachable(f"{s3_bucket}-missing/x", "dataset")
        messages.append(str(info.value))
    out, err = capfd.readouterr()
    assert len(messages) == 5
    for text in (*messages, caplog.text, out, err):
        assert SECRET not in text


def test_ray_filesystem_pickles(s3_bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.ray_filesystem(str(tmp_path)) is None
    _config_only(monkeypatch, s3_endpoint)  # credentials only in the options: they must travel with the pickle
    storage.write_text(f"{s3_bucket}/p/hello.txt", "from the driver")
    fs = storage.ray_filesystem(f"{s3_bucket}/p")
    assert fs is not None
    copy = pickle.loads(pickle.dumps(fs))
    storage.configure(None)
    storage.clear_cache()
    with copy.open_input_stream(f"{s3_bucket.removeprefix('s3://')}/p/hello.txt") as f:
        assert f.read() == b"from the driver"
