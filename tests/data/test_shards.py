"""Shard writing, meta files and dataset preparation (real pyarrow, real Fashion-MNIST)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from excb.data import (
    FASHION_MNIST_CLASSES,
    DatasetNotFoundError,
    decode_image,
    list_shards,
    prepare_image_folder,
    read_meta,
    shards_exist,
    write_meta,
    write_split,
)
from excb.data.shards import FORMAT


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _tables(dest: str, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in list_shards(dest, split)])


# --------------------------------------------------------------------------- write_split / meta


def test_write_split_shards_and_rewrite(tmp_path: Path) -> None:
    dest = str(tmp_path / "ds")
    rows = [(f"r{i}", bytes([i]), i % 3) for i in range(25)]
    assert write_split(rows, dest, "train", rows_per_shard=10) == 25
    names = sorted(p.name for p in (tmp_path / "ds" / "train").iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = _tables(dest, "train")
    assert table.schema.names == ["id", "image", "label"]
    assert table.column("label").to_pylist() == [i % 3 for i in range(25)]
    # Re-writing with fewer rows removes stale shards; nothing temporary is left behind.
    assert write_split(rows[:5], dest, "train", rows_per_shard=10) == 5
    names = sorted(p.name for p in (tmp_path / "ds" / "train").iterdir())
    assert names == ["part-00000.parquet"]


def test_write_split_unlabelled_and_mixed(tmp_path: Path) -> None:
    dest = str(tmp_path / "ds")
    assert write_split([("a", b"x", None), ("b", b"y", None)], dest, "train") == 2
    assert _tables(dest, "train").schema.names == ["id", "image"]
    with pytest.raises(ValueError, match="all labelled or all unlabelled"):
        write_split([("a", b"x", 1), ("b", b"y", None)], dest, "test")


def test_meta_round_trip_and_missing(tmp_path: Path) -> None:
    dest = str(tmp_path / "ds")
    with pytest.raises(DatasetNotFoundError, match="excb prepare") as info:
        read_meta(dest)
    assert "meta.json" in str(info.value)
    assert not shards_exist(dest)
    meta = {"dataset": "x", "splits": {"train": 1}, "classes": None, "channels": 3,
            "image_size": None, "format": FORMAT}
    write_meta(dest, meta)
    assert read_meta(dest) == meta
    assert not shards_exist(dest)  # meta but no shards
    write_split([("a", b"x", None)], dest, "train")
    assert shards_exist(dest)
    assert [p.name for p in (tmp_path / "ds").iterdir() if ".tmp-" in p.name] == []


# --------------------------------------------------------------------------- Fashion-MNIST


def test_prepare_fashion_mnist(
    prepared: str, prepared_rows: int, fashion_test: tuple[np.ndarray, np.ndarray]
) -> None:
    meta = json.loads((Path(prepared) / "meta.json").read_text())
    assert meta == {
        "dataset": "fashion-mnist",
        "splits": {"train": prepared_rows, "test": prepared_rows},
        "classes": FASHION_MNIST_CLASSES,
        "channels": 1,
        "image_size": 28,
        "format": FORMAT,
    }
    assert len(meta["classes"]) == 10
    assert shards_exist(prepared)
    assert [Path(p).name for p in list_shards(prepared, "test")] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"
    ]
    table = _tables(prepared, "test")
    assert table.schema == pa.schema(
        [("id", pa.string()), ("image", pa.binary()), ("label", pa.int64())]
    )
    assert table.num_rows == prepared_rows
    assert table.column("id")[0].as_py() == "test-000000"
    assert table.column("id")[-1].as_py() == f"test-{prepared_rows - 1:06d}"
    images, labels = fashion_test
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels[:prepared_rows])
    for i, data in enumerate(table.column("image").to_pylist()):
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_array_equal(decode_image(data, 28, 1)[0], images[i])  # lossless


# --------------------------------------------------------------------------- image folders


def _save(path: Path, pixels: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture()
def image_tree(tmp_path: Path, fashion_test: tuple[np.ndarray, np.ndarray]) -> tuple[Path, dict]:
    """train/{bag,coat,sneaker}/ (PNG + JPEG) and val/{bag,sneaker}/ made of real images."""
    images, labels = fashion_test
    src = tmp_path / "tree"
    names = {8: "bag", 4: "coat", 7: "sneaker"}
    expected: dict[str, tuple[str, np.ndarray]] = {}  # id -> (class, pixels)
    counts = {"train": 0, "val": 0}
    for cls_index, cls in names.items():
        idx = np.flatnonzero(labels == cls_index)[:5]
        for j, i in enumerate(idx):
            split = "val" if j == 4 and cls != "coat" else "train"
            ext, fmt = (".PNG", "PNG") if j % 2 == 0 else (".jpg", "JPEG")
            rel = f"{split}/{cls}/img{i}{ext}"
            _save(src / rel, images[i], fmt)
            expected[rel] = (cls, images[i])
            counts[split] += 1
    (src / "train" / "bag" / "notes.txt").write_text("not an image")
    return src, {"expected": expected, "counts": counts}


def test_prepare_image_folder_labelled(tmp_path: Path, image_tree: tuple[Path, dict]) -> None:
    src, info = image_tree
    dest = str(tmp_path / "out")
    meta = prepare_image_folder(str(src), dest, rows_per_shard=4)
    assert meta["classes"] == ["bag", "coat", "sneaker"]
    assert meta["splits"] == {"train": info["counts"]["train"], "test": info["counts"]["val"]}
    assert meta["channels"] == 1 and meta["image_size"] is None
    assert meta["dataset"] == "tree" and meta["format"] == FORMAT
    assert read_meta(dest) == meta
    assert len(list_shards(dest, "train")) == 4  # 13 rows / 4 per shard
    seen = 0
    for split in ("train", "test"):
        table = _tables(dest, split)
        assert table.schema.names == ["id", "image", "label"]
        for row in table.to_pylist():
            cls, pixels = info["expected"][row["id"]]
            assert row["label"] == meta["classes"].index(cls)
            assert row["id"].startswith("train/" if split == "train" else "val/")
            assert row["image"] == (src / row["id"]).read_bytes()  # original bytes kept
            decoded = decode_image(row["image"], 28, 1)[0]
            if row["id"].endswith(".PNG"):
                np.testing.assert_array_equal(decoded, pixels)
            else:  # JPEG is lossy
                assert np.abs(decoded.astype(int) - pixels).mean() < 12
            seen += 1
    assert seen == len(info["expected"])
    # limit caps rows per split and interleaves classes
    limited = prepare_image_folder(str(src), str(tmp_path / "lim"), limit=3)
    assert limited["splits"] == {"train": 3, "test": 2}
    assert sorted(_tables(str(tmp_path / "lim"), "train").column("label").to_pylist()) == [0, 1, 2]


def test_prepare_image_folder_unlabelled_rgb(tmp_path: Path, fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = fashion_test
    src = tmp_path / "flat"
    for i in range(6):
        rgb = np.stack([images[i], images[i + 1], images[i + 2]], axis=-1)
        _save(src / f"photo_{i}.jpeg", rgb, "JPEG")
    dest = str(tmp_path / "out")
    meta = prepare_image_folder(str(src), dest)
    assert meta["splits"] == {"train": 6}
    assert meta["classes"] is None
    assert meta["channels"] == 3
    table = _tables(dest, "train")
    assert table.schema.names == ["id", "image"]  # no fake labels
    assert sorted(table.column("id").to_pylist()) == [f"photo_{i}.jpeg" for i in range(6)]


def test_prepare_image_folder_flat_splits(tmp_path: Path, fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = fashion_test
    src = tmp_path / "tree"
    for i in range(3):
        _save(src / "train" / f"{i}.png", images[i], "PNG")
        _save(src / "test" / f"{i}.bmp", images[i], "BMP")
    meta = prepare_image_folder(str(src), str(tmp_path / "out"))
    assert meta["splits"] == {"train": 3, "test": 3} and meta["classes"] is None
    assert _tables(str(tmp_path / "out"), "test").schema.names == ["id", "image"]


def test_prepare_image_folder_errors(tmp_path: Path, fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = fashion_test
    with pytest.raises(DatasetNotFoundError):
        prepare_image_folder(str(tmp_path / "missing"), str(tmp_path / "out"))
    mixed = tmp_path / "mixed"
    _save(mixed / "loose.png", images[0], "PNG")
    _save(mixed / "cls" / "a.png", images[1], "PNG")
    with pytest.raises(ValueError, match="class subfolders"):
        prepare_image_folder(str(mixed), str(tmp_path / "out"))
    unknown = tmp_path / "unknown"
    _save(unknown / "train" / "a" / "x.png", images[0], "PNG")
    _save(unknown / "val" / "b" / "y.png", images[1], "PNG")
    with pytest.raises(ValueError, match="do not exist in the train split"):
        prepare_image_folder(str(unknown), str(tmp_path / "out"))
