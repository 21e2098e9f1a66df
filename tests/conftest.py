"""Fixtures shared by every test module.

Tests marked ``ray`` use one local Ray instance for the whole session (starting Ray costs seconds). Only one Ray
instance may run on a machine at a time. Object-storage tests use a real ``moto_server`` subprocess (S3 API).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from testkit.net import free_port

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test caches (reference scores) in a folder of its own, never in the user's ~/.cache/excb."""
    monkeypatch.setenv("EXCB_CACHE_DIR", str(tmp_path_factory.mktemp("excb-cache")))


@pytest.fixture(scope="session")
def _ray_teardown() -> Iterator[None]:
    """Shut down whatever Ray instance the session's tests left running."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture()
def ray_session(_ray_teardown: None) -> None:
    """A local 2-CPU Ray instance, started on first use and shared by the following tests (a test that needs
    its own cluster, like the elastic one, shuts it down; the next user starts it again)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, logging_level=logging.WARNING)  # the dashboard serves the State API Train needs


@contextlib.contextmanager
def _moto_server(**env: str) -> Iterator[str]:
    """Run the real ``moto_server`` executable (next to this Python) on a free port; yields its URL."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.is_file():
        pytest.skip(f"{exe} not installed (pip install 'moto[server]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    try:
        while True:  # no deadline: a server that never comes up fails through its exit code
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode} before answering on {url}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except urllib.error.HTTPError:  # an HTTP answer, e.g. 403 from a server that checks credentials
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def fm_shards(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """``fm_shards(rows=320, rows_per_shard=100)``: the path of the first ``rows`` Fashion-MNIST training images
    (and the test split) written as shards, made once per session for each shape."""
    from excb.data import prepare_fashion_mnist

    made: dict[tuple[int, int], str] = {}

    def make(rows: int = 320, rows_per_shard: int = 100) -> str:
        if (rows, rows_per_shard) not in made:
            dest = str(tmp_path_factory.mktemp("shards") / "fm")
            prepare_fashion_mnist(dest, limit=rows, rows_per_shard=rows_per_shard)
            made[(rows, rows_per_shard)] = dest
        return made[(rows, rows_per_shard)]

    return make


@pytest.fixture(scope="session")
def shards(fm_shards: Callable[..., str]) -> str:
    """320 Fashion-MNIST training images in shards of 100 (the end-to-end tests' default data)."""
    return fm_shards()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real moto S3 server (subprocess) for the session; yields ``http://127.0.0.1:PORT``."""
    with _moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def s3_auth_endpoint() -> Iterator[str]:
    """A moto S3 server that checks credentials (only its IAM users' keys are accepted)."""
    with _moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as url:
        yield url


@pytest.fixture()
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new, empty bucket on :func:`s3_endpoint` with the AWS variables set to reach it; yields ``s3://bucket``.

    Storage options and cached filesystems are reset afterwards.
    """
    boto3 = pytest.importorskip("boto3")
    import excb.storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    bucket = f"excb-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    excb.storage.configure(None)
    try:
        yield f"s3://{bucket}"
    finally:
        excb.storage.configure(None)
        excb.storage.clear_cache()
