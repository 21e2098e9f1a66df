"""The data-format registry and the one image-file rule (no Ray: nothing here reads a split with Ray Data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from excb.config import DATA_FORMATS
from excb.data import DatasetNotFoundError, formats
from excb.data.image_files import (
    IMAGE_EXTENSIONS,
    IMAGE_SUFFIXES,
    is_hidden,
    is_image_file,
    is_image_suffix,
)
from excb.data.image_folder import list_image_folder
from excb.data.pipeline import count_split_rows, load_split_arrays
from excb.data.registry import (
    DATA_FORMAT_REGISTRY,
    FORMATS,
    ImageFolderFormat,
    ShardFormat,
    WebDatasetFormat,
    data_format,
    require_split,
)


def test_registry_names_are_the_config_formats() -> None:
    assert DATA_FORMAT_REGISTRY.names() == FORMATS == formats.FORMATS == DATA_FORMATS
    assert all(name in DATA_FORMAT_REGISTRY for name in DATA_FORMATS)


def test_entries_are_frozen_and_built_from_keywords(tmp_path: Path) -> None:
    options = {"retries": 5, "known_rows": 7, "unused": 1}  # each entry takes the options it names
    assert data_format("shards", **options) == ShardFormat(retries=5)
    assert data_format("image_folder", **options) == ImageFolderFormat(known_rows=7)
    assert data_format("webdataset", **options) == WebDatasetFormat(known_rows=7)
    assert data_format("shards") == ShardFormat(retries=3)
    entry = data_format("image_folder", known_rows=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.known_rows = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        ShardFormat(5)  # type: ignore[misc]  # keyword arguments only
    missing = str(tmp_path / "missing")
    assert entry.count_rows(missing, "train") == 7  # a known count needs no listing
    assert data_format("webdataset", known_rows=7).count_rows(missing, "train") == 7
    assert data_format("shards", known_rows=7).count_rows(missing, "train") == 0  # footers, not the known count


def test_unknown_format_names_the_known_ones(tmp_path: Path) -> None:
    known = ", ".join(DATA_FORMATS)
    with pytest.raises(ValueError, match=f"unknown data format 'parquet' \\(known: {known}\\)"):
        data_format("parquet")
    for call in (
        lambda: require_split(str(tmp_path), "train", "parquet"),
        lambda: count_split_rows(str(tmp_path), "train", "parquet", known=5),
        lambda: load_split_arrays(str(tmp_path), "train", image_size=8, channels=1, fmt="parquet"),
    ):
        with pytest.raises(ValueError, match=known):
            call()


@pytest.mark.parametrize(
    ("name", "image", "image_unless_hidden"),
    [
        ("a.jpg", True, True),
        ("a.JPG", True, True),
        ("a.jpeg", True, True),
        ("a.Jpeg", True, True),
        ("a.png", True, True),
        ("a.bmp", True, True),
        ("a.WEBP", True, True),
        ("a.b.png", True, True),
        ("a.txt", False, False),
        ("a.cls", False, False),
        ("a.tar", False, False),
        ("a.gif", False, False),
        ("jpg", False, False),
        ("a.jpg.txt", False, False),
        (".jpg", False, False),  # no extension: the whole name is the stem
        (".hidden.jpg", True, False),
        ("_x.png", True, False),
        ("__x.JPEG", True, False),
    ],
)
def test_image_file_rule(name: str, image: bool, image_unless_hidden: bool) -> None:
    assert is_image_file(name, skip_hidden=False) is image
    assert is_image_file(name, skip_hidden=True) is image_unless_hidden


def test_one_extension_set() -> None:
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    assert IMAGE_SUFFIXES == ("bmp", "jpeg", "jpg", "png", "webp") == formats.IMAGE_SUFFIXES
    assert all(is_image_suffix(s) and is_image_suffix(s.upper()) for s in IMAGE_SUFFIXES)
    assert not is_image_suffix("cls") and not is_image_suffix("") and not is_image_suffix(".jpg")
    assert is_hidden(".a") and is_hidden("_a") and not is_hidden("a_.jpg")
    from excb.data.webdataset import _WDS_IMAGE_ORDER

    assert sorted(_WDS_IMAGE_ORDER) == list(IMAGE_SUFFIXES)


def test_hidden_names_per_call_site(tmp_path: Path) -> None:
    """Pins today's behaviour at each call site: the cheap split check skips ``.``/``_`` names, the recursive
    image-folder listing (and ``excb prepare images``) keeps them."""
    only_hidden = tmp_path / "hidden"
    (only_hidden / "train" / "cat").mkdir(parents=True)
    (only_hidden / "train" / "cat" / "_x.png").write_bytes(b"x")
    (only_hidden / "train" / "cat" / ".y.jpg").write_bytes(b"y")
    with pytest.raises(DatasetNotFoundError, match="no images in"):
        require_split(str(only_hidden), "train", "image_folder")
    listed = sorted(Path(p).name for p, _ in list_image_folder(str(only_hidden), "train").items)
    assert listed == [".y.jpg", "_x.png"]
