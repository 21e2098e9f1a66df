"""Raw image datasets read in place: an ImageNet-style image folder and WebDataset tars, locally and on a real S3
server (moto), through the Ray Data path the trainer uses (materialised and streamed), the in-process evaluation
reader, the dataset checks, and one streamed pretraining run.

The synthetic images are solid colours that encode their id (red, blue) and class (green), in mixed sizes and
aspect ratios, half PNG and half JPEG, so every check can tell which decoded image belongs to which id and label.
"""

from __future__ import annotations

import io
import posixpath
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from testkit.tars import tar_bytes

from excb.config import StorageConfig, load_config
from excb.data import DatasetNotFoundError, decoded_split, load_split_arrays
from excb.data.formats import detect_format, list_image_folder, require_split
from excb.data.pipeline import count_split_rows
from excb.storage import atomic_write_bytes, configure, resolve_fs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLASSES = ["cat", "dog", "emu"]  # sorted: labels 0, 1, 2
SIZE = 16  # decoded size


def _colour(i: int, label: int) -> tuple[int, int, int]:
    return (10 * (i % 24) + 5, 60 + 80 * label, 250 - 10 * (i // 24))


def _encode(i: int, label: int) -> tuple[bytes, str]:
    w, h = (40, 30) if i % 3 else (25, 33)  # landscape and portrait: resize + centre crop
    img = Image.new("RGB", (w, h), _colour(i, label))
    buf = io.BytesIO()
    fmt = "PNG" if i % 2 else "JPEG"
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue(), ("png" if fmt == "PNG" else "jpg")


def _put(uri: str, rel: str, data: bytes) -> None:
    fs, root = resolve_fs(uri)
    atomic_write_bytes(fs, posixpath.join(root, rel), data)


def _samples(n: int, offset: int = 0) -> list[tuple[int, int]]:
    """(image index, label) for ``n`` images spread over the classes."""
    return [(offset + k, k % len(CLASSES)) for k in range(n)]


def write_image_folder(uri: str, train: int = 24, val: int = 6) -> dict[str, tuple[int, int]]:
    """``train/<class>/img<i>.{png,jpg}`` and ``val/<class>/…``; returns {id: (index, label)}."""
    expected = {}
    for split, items in (("train", _samples(train)), ("val", _samples(val, offset=100))):
        for i, label in items:
            data, ext = _encode(i, label)
            # upper-case extensions on some files, as ImageNet's .JPEG
            rel = f"{split}/{CLASSES[label]}/img{i:03d}.{ext.upper() if i % 4 == 0 else ext}"
            _put(uri, rel, data)
            expected[rel] = (i, label)
    return expected


def write_webdataset(uri: str, train: int = 24, val: int = 6, per_tar: int = 10) -> dict[str, tuple[int, int]]:
    """``train/shard-NNNNN.tar`` with ``<key>.jpg|png`` + ``<key>.cls`` members (and ``val/``); returns
    {key: (index, label)}."""
    expected = {}
    for split, items in (("train", _samples(train)), ("val", _samples(val, offset=100))):
        for t in range(0, len(items), per_tar):
            members = []
            for i, label in items[t:t + per_tar]:
                data, ext = _encode(i, label)
                key = f"{split}-{i:05d}"
                members += [(f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())]
                expected[key] = (i, label)
            _put(uri, f"{split}/shard-{t // per_tar:05d}.tar", tar_bytes(members))
    return expected


def _check_arrays(x: np.ndarray, y: np.ndarray, expected_labels: list[int]) -> None:
    assert x.dtype == np.uint8 and x.shape == (len(expected_labels), 3, SIZE, SIZE)
    assert sorted(y.tolist()) == sorted(expected_labels)
    for img, label in zip(x, y, strict=True):  # green channel carries the class
        assert abs(int(img[1].mean()) - (60 + 80 * label)) <= 3


def _check_rows(rows: list[dict], expected: dict[str, tuple[int, int]], split: str) -> None:
    want = {k: v for k, v in expected.items() if k.startswith(split)}
    assert sorted(str(r["id"]) for r in rows) == sorted(want)  # every image exactly once
    for r in rows:
        i, label = want[str(r["id"])]
        assert int(r["label"]) == label
        img = np.asarray(r["image"])
        assert img.shape == (3, SIZE, SIZE) and img.dtype == np.uint8
        colour = img.reshape(3, -1).mean(axis=1)
        assert np.abs(colour - np.array(_colour(i, label))).max() <= 3, (r["id"], colour)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh dataset root: a local folder, or a prefix in a new bucket on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "ds")
    bucket = request.getfixturevalue("s3_bucket")
    # explicit options, as a run configures them: Ray's worker processes may predate the AWS variables
    configure(StorageConfig(endpoint_url=request.getfixturevalue("s3_endpoint"), region="us-east-1",
                            access_key_id="test", secret_access_key="test"))
    return f"{bucket}/ds"


# --------------------------------------------------------------------------- in-process readers, listings, checks


def test_config_keys() -> None:
    from excb.config import ConfigError

    cfg = load_config(None, ["data.materialize=true", "data.format=image_folder", "data.dataset=x"])
    assert cfg.data.materialize is True and cfg.data.format == "image_folder"
    assert load_config(None, []).data.materialize == "auto" and load_config(None, []).data.format == "shards"
    for bad, key in [("data.format=parquet", "data.format"), ("data.materialize=maybe", "data.materialize"),
                     ("data.train_rows=-1", "data.train_rows"), ("data.format=webdataset", "data.format"),
                     ("model.drop_path=0.1", "model.drop_path")]:  # fashion_mnist is shards; drop-path is ViT's
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])



def test_image_folder_listing_and_arrays(where: str) -> None:
    expected = write_image_folder(where)
    assert detect_format(where, "train") == "image_folder" and detect_format(where, "test") == "image_folder"
    listing = list_image_folder(where, "train")
    assert listing.classes == CLASSES
    assert [label for _, label in listing.items[:6]] == [0, 1, 2, 0, 1, 2]  # classes interleaved
    assert count_split_rows(where, "train", "image_folder") == 24
    x, y = load_split_arrays(where, "train", image_size=SIZE, channels=3)
    _check_arrays(x, y, [label for k, (_, label) in expected.items() if k.startswith("train")])
    x, y = load_split_arrays(where, "test", image_size=SIZE, channels=3)  # val/ is the test split
    _check_arrays(x, y, [0, 1, 2, 0, 1, 2])
    x, y = load_split_arrays(where, "train", image_size=SIZE, channels=3, limit=5)  # class-balanced prefix
    assert y.tolist() == [0, 1, 2, 0, 1]


def test_webdataset_arrays(where: str) -> None:
    expected = write_webdataset(where)
    assert detect_format(where, "train") == "webdataset"
    x, y = load_split_arrays(where, "train", image_size=SIZE, channels=3)
    _check_arrays(x, y, [label for k, (_, label) in expected.items() if k.startswith("train")])
    x, y = load_split_arrays(where, "test", image_size=SIZE, channels=3, limit=4)
    _check_arrays(x, y, [0, 1, 2, 0])


def test_missing_or_empty_data_is_a_clear_error(where: str) -> None:
    for fmt in ("image_folder", "webdataset"):
        with pytest.raises(DatasetNotFoundError, match="no train split at .*train/"):
            require_split(where, "train", fmt)
    with pytest.raises(DatasetNotFoundError, match="no split 'train'"):
        load_split_arrays(where, "train", image_size=SIZE, channels=3)
    _put(where, "train/cat/notes.txt", b"not an image")  # a class folder without images
    with pytest.raises(DatasetNotFoundError, match="no images in .*train"):
        require_split(where, "train", "image_folder")
    with pytest.raises(DatasetNotFoundError, match="no images in"):
        list_image_folder(where, "train")
    with pytest.raises(DatasetNotFoundError, match=r"no \*\.tar shards in .*train"):
        require_split(where, "train", "webdataset")
    data, ext = _encode(0, 0)
    _put(where, f"train/cat/a.{ext}", data)
    require_split(where, "train", "image_folder")  # now there is an image
    with pytest.raises(DatasetNotFoundError, match="no test split .*val/ or test/"):
        require_split(where, "test", "image_folder")


def test_ensure_dataset_checks_the_format_not_shards(tmp_path: Path) -> None:
    from excb.run.startup import ensure_dataset

    root = tmp_path / "wds"
    base = ["data.dataset=mine", "data.format=webdataset", "data.channels=3", "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.2,0.2,0.2]", f"data.path={root}"]
    with pytest.raises(DatasetNotFoundError, match="no train split"):
        ensure_dataset(load_config(None, base))
    write_webdataset(str(root), val=0)  # train tars only
    with pytest.raises(DatasetNotFoundError, match="kNN evaluation needs it"):
        ensure_dataset(load_config(None, base))
    ensure_dataset(load_config(None, [*base, "eval.epoch_knn_train=0", "eval.final_eval=false"]))
    write_webdataset(str(root))
    ensure_dataset(load_config(None, base))  # no Parquet shards asked for


# --------------------------------------------------------------------------- through Ray Data


def _rows(ds) -> list[dict]:
    return list(ds.iter_rows())


@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["image_folder", "webdataset"])
def test_ray_data_materialised_and_streamed(ray_session: None, where: str, fmt: str) -> None:
    expected = (write_image_folder if fmt == "image_folder" else write_webdataset)(where)
    kw = dict(image_size=SIZE, channels=3, fmt=fmt)
    whole = decoded_split(where, "train", **kw)
    assert not whole.streamed and whole.rows == 24 and whole.corrupt == 0
    assert set(whole.dataset.schema().names) == {"id", "image", "valid_hw", "label"}
    _check_rows(_rows(whole.dataset), expected, "train")

    streamed = decoded_split(where, "train", materialize=False, shuffle_seed=3, **kw)
    assert streamed.streamed and streamed.rows == 24  # counted before decoding
    first, second = _rows(streamed.dataset), _rows(streamed.dataset)  # two passes: read + decode again
    _check_rows(first, expected, "train")
    _check_rows(second, expected, "train")

    test = decoded_split(where, "test", materialize=False, **kw)
    _check_rows(_rows(test.dataset), expected, "val")

    # data.train_decode=fit: whole images at the canvas's top-left, their size carried in valid_hw
    fitted = decoded_split(where, "train", materialize=False, shuffle_seed=3, fit=True, **kw)
    for r in _rows(fitted.dataset):
        i = want_index = expected[str(r["id"])][0]
        h, w = (int(v) for v in r["valid_hw"])
        assert (h, w) == ((12, 16) if want_index % 3 else (16, 12)), (r["id"], h, w)  # 40x30 and 25x33 wholes
        img = np.asarray(r["image"])
        assert img[:, h:, :].max(initial=0) == 0 and img[:, :, w:].max(initial=0) == 0
        assert np.abs(img[:, :h, :w].reshape(3, -1).mean(axis=1) - np.array(_colour(i, expected[str(r["id"])][1]))).max() <= 3

    part = decoded_split(where, "train", materialize=False, limit=7, **kw)
    assert part.rows == 7 and len(_rows(part.dataset)) == 7


@pytest.mark.ray
def test_streaming_drops_corrupt_images(ray_session: None, tmp_path: Path) -> None:
    root = str(tmp_path / "ds")
    write_image_folder(root, train=9, val=3)
    _put(root, "train/dog/broken.jpg", b"\xff\xd8\xff not a jpeg")
    assert count_split_rows(root, "train", "image_folder") == 10  # listed before decoding
    kw = dict(image_size=SIZE, channels=3, fmt="image_folder")
    whole = decoded_split(root, "train", **kw)
    assert whole.rows == 9 and whole.corrupt == 1 and whole.corrupt_ids == ["train/dog/broken.jpg"]
    streamed = decoded_split(root, "train", materialize=False, **kw)
    ids = sorted(str(r["id"]) for r in _rows(streamed.dataset))
    assert len(ids) == 9 and "train/dog/broken.jpg" not in ids


# --------------------------------------------------------------------------- one streamed pretraining run


@pytest.mark.ray
def test_pretrain_streams_webdataset(ray_session: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from testkit.configs import TINY

    from excb.run.pretrain import run_pretraining
    from excb.rundir.runfiles import SAMPLE_IDS_DIR, read_metrics, read_summary

    data = tmp_path / "wds"
    expected = write_webdataset(str(data), train=48, val=12, per_tar=16)
    cfg = load_config(None, [*TINY, "data.dataset=synthetic", "data.format=webdataset", "data.materialize=false",
                             f"data.path={data}", "data.channels=3", f"data.image_size={SIZE}",
                             "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", f"augment.global_size={SIZE}",
                             "augment.local_size=8", "train.batch_size=16", "train.epochs=1",
                             "train.record_sample_ids=true", "method.kmeans_samples=48",
                             "eval.epoch_knn_train=48", "eval.epoch_knn_test=12"])
    summary = run_pretraining(cfg, storage_path=str(tmp_path / "runs"), name="wds")
    assert "streaming the train split (48 images, data.format=webdataset)" in capfd.readouterr().out
    history = read_metrics(str(tmp_path / "runs" / "wds"))
    assert [r["epoch"] for r in history] == [1] and history[0]["step"] == 3  # 48 rows // 16
    assert np.isfinite(history[0]["loss"]) and "subset_knn_top1" in history[0]
    files = list((tmp_path / "runs" / "wds" / SAMPLE_IDS_DIR).glob("epoch0001-rank0-*.txt"))
    assert len(files) == 1
    consumed = files[0].read_text().split()
    assert sorted(consumed) == sorted(k for k in expected if k.startswith("train"))  # each streamed key once
    on_disk = read_summary(str(tmp_path / "runs" / "wds"))
    assert on_disk["train_rows"] == 48 and on_disk["eval_train_rows"] == 48 and on_disk["eval_test_rows"] == 12
    assert summary["knn_top1"] == on_disk["knn_top1"] > 100 / 3  # solid class colours: far above chance
