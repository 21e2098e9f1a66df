"""decode_image / decode_batch on real Fashion-MNIST images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from excb.data import CorruptImageError, decode_batch, decode_image


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _batch(images: list[bytes], labels: list[int] | None = None) -> dict[str, np.ndarray]:
    batch = {
        "id": np.array([f"row-{i}" for i in range(len(images))], dtype=object),
        "image": np.array(images, dtype=object),
    }
    if labels is not None:
        batch["label"] = np.array(labels, dtype=np.int64)
    return batch


def test_decode_image_gray_rgb_and_resize(fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    pixels = fashion_test[0][0]
    gray = decode_image(_encode(pixels), 28, 1)
    assert gray.shape == (1, 28, 28) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[0], pixels)
    rgb = decode_image(_encode(pixels), 28, 3)
    assert rgb.shape == (3, 28, 28)
    for c in range(3):
        np.testing.assert_array_equal(rgb[c], pixels)
    # Non-square: shorter side resized to 16, then centre-cropped.
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # white centre band, half the width
    out = decode_image(_encode(wide), 16, 3)
    assert out.shape == (3, 16, 16)
    assert out[:, :, 4:12].min() > 200  # centre crop is (almost) all white
    up = decode_image(_encode(pixels), 56, 1)
    assert up.shape == (1, 56, 56)


def test_decode_batch_flags_corrupt_rows(fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = fashion_test
    encoded = [_encode(images[0]), b"definitely not an image", _encode(images[1])[:60]]
    out = decode_batch(_batch(encoded, [int(labels[0]), 5, 7]), image_size=28, channels=1)
    assert out["image"].shape == (3, 1, 28, 28) and out["image"].dtype == np.uint8
    assert out["ok"].tolist() == [True, False, False]
    assert int((~out["ok"]).sum()) == 2
    assert not out["image"][1:].any()  # corrupt rows are zero images
    np.testing.assert_array_equal(out["image"][0, 0], images[0])
    assert out["label"].tolist() == [int(labels[0]), 5, 7]
    assert out["id"].tolist() == ["row-0", "row-1", "row-2"]


def test_decode_batch_without_labels() -> None:
    out = decode_batch(_batch([_encode(np.full((8, 8), 9, np.uint8))]), image_size=4, channels=3)
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [-1]
    assert out["image"].shape == (1, 3, 4, 4) and (out["image"] == 9).all()


def test_decode_batch_strict_names_row(fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    encoded = [_encode(fashion_test[0][0]), b"\x89PNG garbage"]
    with pytest.raises(CorruptImageError, match="row-1"):
        decode_batch(_batch(encoded, [0, 1]), image_size=28, channels=1, strict=True)
    with pytest.raises(ValueError, match="channels"):
        decode_batch(_batch(encoded, [0, 1]), image_size=28, channels=2)


def test_chunks_keep_order_and_the_short_tail() -> None:
    from excb.data.decode import chunks

    assert list(chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 3)) == []


def test_decode_batches_keeps_decoded_rows_and_is_empty_for_none() -> None:
    from PIL import Image

    from excb.data.decode import decode_batch, decode_batches

    buf = io.BytesIO()
    Image.new("L", (10, 10), color=200).save(buf, format="PNG")
    good = buf.getvalue()
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "image": np.array([good, b"junk", good], dtype=object),
             "label": np.array([1, 2, 3])}
    x, y = decode_batches([batch, batch], decode_batch, image_size=8, channels=1)
    assert x.shape == (4, 1, 8, 8) and x.dtype == np.uint8 and y.tolist() == [1, 3, 1, 3]
    x, y = decode_batches([], decode_batch, image_size=8, channels=3)
    assert x.shape == (0, 3, 8, 8) and y.shape == (0,)


def test_decode_image_fit_keeps_the_whole_image_in_a_padded_canvas() -> None:
    from excb.data.decode import decode_image_fit

    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :10] = 200  # the left quarter: a centre crop would cut it off
    canvas, (h, w) = decode_image_fit(_encode(wide), 16, 3)
    assert canvas.shape == (3, 16, 16) and (h, w) == (8, 16)
    assert canvas[:, :8, :3].min() >= 190 and canvas[:, :8, 5:].max() <= 10  # the whole width is there
    assert canvas[:, 8:].max() == 0  # padding below the image
    tall, (h, w) = decode_image_fit(_encode(np.full((30, 10), 99, dtype=np.uint8)), 15, 1)
    assert (h, w) == (15, 5) and tall[0, :, :5].min() == 99 and tall[0, :, 5:].max() == 0
    same, hw = decode_image_fit(_encode(np.full((12, 12), 7, dtype=np.uint8)), 12, 1)
    assert hw == (12, 12) and (same == 7).all()
    out = decode_batch(_batch([_encode(wide), b"junk"]), image_size=16, channels=3, fit=True)
    assert out["valid_hw"].tolist() == [[8, 16], [16, 16]] and out["ok"].tolist() == [True, False]
    assert decode_batch(_batch([_encode(wide)]), image_size=16, channels=3)["valid_hw"].tolist() == [[16, 16]]
