"""IDX readers and Fashion-MNIST discovery, on the real files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from excb.data import (
    DatasetNotFoundError,
    load_fashion_mnist,
    read_idx_images,
    read_idx_labels,
)
from excb.data.fashion_mnist import ENV_VAR


def _write_idx(path: Path, magic: int, array: np.ndarray, compress: bool = False) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_read_real_train_and_test(fashion_dir: Path) -> None:
    x = read_idx_images(fashion_dir / "train-images-idx3-ubyte.gz")
    y = read_idx_labels(fashion_dir / "train-labels-idx1-ubyte.gz")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9
    assert np.bincount(y).tolist() == [6000] * 10
    xt, yt = load_fashion_mnist("test", root=str(fashion_dir))
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert set(np.unique(yt)) == set(range(10))
    assert x.max() == 255 and x.min() == 0


def test_plain_idx_and_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    labels = np.array([1, 7, 3])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", 2051, images)  # plain
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, labels, compress=True)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    x, y = load_fashion_mnist("test", root=str(tmp_path / "missing"))
    np.testing.assert_array_equal(x, images.astype(np.uint8))
    np.testing.assert_array_equal(y, labels)


def test_bad_magic_and_truncation(tmp_path: Path) -> None:
    labels = np.array([1, 2, 3])
    _write_idx(tmp_path / "labels", 2049, labels)
    with pytest.raises(ValueError, match="magic"):
        read_idx_images(tmp_path / "labels")
    (tmp_path / "short").write_bytes((tmp_path / "labels").read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes"):
        read_idx_labels(tmp_path / "short")


def test_missing_dataset_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    bogus = tmp_path / "bogus"
    with pytest.raises(DatasetNotFoundError) as info:
        # download=False keeps the test hermetic on machines that do have internet
        load_fashion_mnist("train", root=str(bogus), search_system=False, download=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert ENV_VAR in message
    assert str(bogus) in message
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")
