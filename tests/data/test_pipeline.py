"""Reading prepared splits: single-process arrays and (marked ``ray``) Ray Data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from excb.data import (
    CorruptImageError,
    DatasetNotFoundError,
    decoded_split,
    load_split_arrays,
    read_split,
)

BAD_IDS = ["bad-0", "bad-1"]

# Ray Data's own DataContext emits these on first use; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture()
def with_corrupt(prepared: str, tmp_path: Path) -> str:
    """A copy of the prepared set whose test split has an extra shard with 2 corrupt rows."""
    dest = tmp_path / "corrupt"
    shutil.copytree(prepared, dest)
    table = pa.table(
        {
            "id": pa.array(BAD_IDS, pa.string()),
            "image": pa.array([b"garbage bytes", b"\x89PNG\r\n\x1a\n truncated"], pa.binary()),
            "label": pa.array([3, 4], pa.int64()),
        }
    )
    pq.write_table(table, dest / "test" / "part-99999.parquet")
    return str(dest)


def test_load_split_arrays(prepared: str, prepared_rows: int, fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = fashion_test
    x, y = load_split_arrays(prepared, "test", image_size=28, channels=1)
    assert x.shape == (prepared_rows, 1, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], images[:prepared_rows])  # deterministic order
    np.testing.assert_array_equal(y, labels[:prepared_rows])
    x5, y5 = load_split_arrays(prepared, "test", image_size=14, channels=3, limit=150)
    assert x5.shape == (150, 3, 14, 14)
    np.testing.assert_array_equal(y5, labels[:150])


def test_load_split_arrays_skips_corrupt(with_corrupt: str, prepared_rows: int) -> None:
    x, y = load_split_arrays(with_corrupt, "test", image_size=28, channels=1)
    assert len(x) == len(y) == prepared_rows


def test_missing_split_errors(prepared: str, tmp_path: Path) -> None:
    for fn in (
        lambda: read_split(prepared, "val"),
        lambda: load_split_arrays(str(tmp_path / "nothing"), "train", image_size=28, channels=1),
    ):
        with pytest.raises(DatasetNotFoundError, match="excb prepare"):
            fn()


@pytest.mark.ray
def test_decoded_split_counts_corrupt(ray_session: None, with_corrupt: str, prepared_rows: int) -> None:
    result = decoded_split(with_corrupt, "test", image_size=28, channels=1)
    assert result.rows == prepared_rows
    assert result.corrupt == 2
    assert sorted(result.corrupt_ids) == BAD_IDS
    ds = result.dataset
    assert ds.count() == prepared_rows
    assert set(ds.schema().names) == {"id", "image", "valid_hw", "label"}
    batch = ds.take_batch(prepared_rows + 10, batch_format="numpy")
    assert not set(batch["id"].tolist()) & set(BAD_IDS)  # the ids of kept rows travel with them
    assert batch["image"].shape == (prepared_rows, 1, 28, 28)
    assert batch["image"].dtype == np.uint8
    assert batch["image"].reshape(prepared_rows, -1).any(axis=1).all()  # no zero images kept
    assert set(batch["label"].tolist()) <= set(range(10))


@pytest.mark.ray
def test_decoded_split_clean_limit_and_strict(
    ray_session: None, prepared: str, with_corrupt: str, fashion_test: tuple[np.ndarray, np.ndarray]
) -> None:
    result = decoded_split(prepared, "train", image_size=16, channels=3, limit=200)
    assert (result.rows, result.corrupt, result.corrupt_ids) == (200, 0, [])
    batch = result.dataset.take_batch(500, batch_format="numpy")
    assert batch["image"].shape == (200, 3, 16, 16)
    with pytest.raises(CorruptImageError, match="row bad-"):
        decoded_split(with_corrupt, "test", image_size=28, channels=1, strict=True)
