"""The same shard code against an S3 endpoint (the ``s3_bucket`` fixture: a real moto server, real S3FileSystem)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from excb.config import StorageConfig
from excb.data import (
    list_shards,
    load_split_arrays,
    prepare_fashion_mnist,
    prepare_image_folder,
    read_meta,
    read_split,
    shards_exist,
    write_split,
)
from excb.storage import configure


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
        client.put_object(Bucket=s3_bucket.removeprefix("s3://"), Key=f"tree/train/{cls}/{i}.png", Body=buf.getvalue())
    meta = prepare_image_folder(f"{s3_bucket}/tree", f"{s3_bucket}/out")
    assert meta["splits"] == {"train": 4} and meta["classes"] == ["a", "b"]
    x, y = load_split_arrays(f"{s3_bucket}/out", "train", image_size=28, channels=1)
    assert sorted(y.tolist()) == [0, 0, 1, 1] and x.shape == (4, 1, 28, 28)


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_read_split_on_s3_uses_configured_storage(
    ray_session: None, s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's read tasks (other processes, no AWS variables) reach the bucket through the configured options."""
    dest = f"{s3_bucket}/ds"
    write_split(((f"r{i}", b"bytes", i) for i in range(10)), dest, "train", rows_per_shard=4)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    configure(StorageConfig(endpoint_url=s3_endpoint, region="us-east-1", access_key_id="k", secret_access_key="s"))
    ids = [row["id"] for row in read_split(dest, "train").iter_rows()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10))
