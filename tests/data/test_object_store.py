"""The same shard code against an S3 endpoint (a local moto server, real pyarrow S3FileSystem)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from excb.data import (
    list_shards,
    load_split_arrays,
    prepare_fashion_mnist,
    prepare_image_folder,
    read_meta,
    shards_exist,
)


@pytest.fixture()
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty bucket on a moto S3 server; yields ``s3://bucket``."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        boto3.client("s3").create_bucket(Bucket="excb-test")
        yield "s3://excb-test"
    finally:
        server.stop()


def test_prepare_and_load_on_s3(s3_bucket: str, fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    dest = f"{s3_bucket}/fm"
    assert not shards_exist(dest)
    meta = prepare_fashion_mnist(dest, limit=50, rows_per_shard=20)
    assert read_meta(dest) == meta
    assert shards_exist(dest)
    assert len(list_shards(dest, "test")) == 3
    x, y = load_split_arrays(dest, "test", image_size=28, channels=1)
    np.testing.assert_array_equal(x[:, 0], fashion_test[0][:50])
    np.testing.assert_array_equal(y, fashion_test[1][:50])


def test_image_folder_from_s3(s3_bucket: str, fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    import boto3

    client = boto3.client("s3")
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(fashion_test[0][i]).save(buf, format="PNG")
        cls = "a" if i % 2 else "b"
        client.put_object(Bucket="excb-test", Key=f"tree/train/{cls}/{i}.png", Body=buf.getvalue())
    meta = prepare_image_folder(f"{s3_bucket}/tree", f"{s3_bucket}/out")
    assert meta["splits"] == {"train": 4} and meta["classes"] == ["a", "b"]
    x, y = load_split_arrays(f"{s3_bucket}/out", "train", image_size=28, channels=1)
    assert sorted(y.tolist()) == [0, 0, 1, 1] and x.shape == (4, 1, 28, 28)
