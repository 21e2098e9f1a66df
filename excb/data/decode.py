"""Decode encoded image bytes into fixed-size uint8 arrays."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from excb.data.errors import CorruptImageError

__all__ = ["chunks", "decode_batch", "decode_batches", "decode_image", "decode_image_fit"]

_MODES = {1: "L", 3: "RGB"}


def _open(data: bytes, image_size: int, channels: int) -> Image.Image:
    """Decode to ``"L"`` or ``"RGB"``; JPEGs at the smallest scale that keeps both sides >= ``image_size``."""
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    mode = _MODES[channels]
    with Image.open(io.BytesIO(data)) as img:
        img.draft(mode, (image_size, image_size))  # JPEG: decode at a reduced scale
        return img.convert(mode)  # forces a full decode, so truncated files raise here


def _chw(img: Image.Image) -> np.ndarray:
    """A decoded image as a contiguous uint8 ``[C, H, W]`` array."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :].copy() if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_image_fit(data: bytes, image_size: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one encoded image whole into a zero-padded uint8 canvas ``[channels, image_size, image_size]``.

    The longer side is resized to ``image_size`` (bilinear), the aspect ratio kept (shorter side
    max(1, round(short · S / long))), and the image placed at the canvas's top-left corner. Returns the canvas and
    the image's (height, width) in it, so crops can be drawn from the whole image and never from the padding.
    """
    img = _open(data, image_size, channels)
    w, h = img.size
    if max(w, h) != image_size:
        s = image_size / max(w, h)
        w, h = max(1, min(image_size, round(w * s))), max(1, min(image_size, round(h * s)))
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    canvas = np.zeros((channels, image_size, image_size), dtype=np.uint8)
    canvas[:, :h, :w] = _chw(img)
    return canvas, (h, w)


def decode_image(data: bytes, image_size: int, channels: int) -> np.ndarray:
    """Decode one encoded image into a uint8 array ``[channels, image_size, image_size]``.

    The image is converted to ``"L"`` (1 channel) or ``"RGB"`` (3 channels).
    If its size differs from ``image_size`` x ``image_size``, its shorter side
    is resized to ``image_size`` (bilinear) and the centre is cropped.

    Raises:
        Exception: whatever PIL raises for undecodable bytes (``OSError``,
            ``ValueError``, ``Image.DecompressionBombError`` ...).
    """
    img = _open(data, image_size, channels)
    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return _chw(img)


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    channels: int,
    strict: bool = False,
    fit: bool = False,
) -> dict[str, np.ndarray]:
    """Decode a numpy batch of shard rows (for ``Dataset.map_batches(batch_format="numpy")``).

    Args:
        batch: columns ``id``, ``image`` (encoded bytes) and optionally ``label``.
        image_size: output side length.
        channels: 1 or 3.
        strict: raise instead of flagging rows that fail to decode.
        fit: decode whole images into padded canvases (:func:`decode_image_fit`) instead of centre crops
            (:func:`decode_image`).

    Returns:
        ``image`` uint8 ``[N, C, S, S]``, ``valid_hw`` int32 ``[N, 2]`` (the image's height and width at the
        canvas's top-left; ``(S, S)`` for centre crops), ``label`` int64 ``[N]`` (-1 when the
        batch has no label column), ``id`` and ``ok`` bool ``[N]``; rows that
        failed to decode have ``ok=False`` and an all-zero image.

    Raises:
        CorruptImageError: with ``strict=True``, for the first undecodable row.
    """
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    encoded = batch["image"]
    ids = batch["id"]
    n = len(encoded)
    images = np.zeros((n, channels, image_size, image_size), dtype=np.uint8)
    valid_hw = np.full((n, 2), image_size, dtype=np.int32)
    ok = np.ones(n, dtype=bool)
    for i in range(n):
        try:
            if fit:
                images[i], valid_hw[i] = decode_image_fit(encoded[i], image_size, channels)
            else:
                images[i] = decode_image(encoded[i], image_size, channels)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt row
            if strict:
                raise CorruptImageError(
                    f"cannot decode image of row {ids[i]!s}: {type(exc).__name__}: {exc}"
                ) from exc
            ok[i] = False
    if "label" in batch:
        labels = np.asarray(batch["label"], dtype=np.int64)
    else:
        labels = np.full(n, -1, dtype=np.int64)
    return {"image": images, "valid_hw": valid_hw, "label": labels, "id": np.asarray(ids), "ok": ok}


T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decode_batches(batches: Iterable[dict[str, np.ndarray]], decode: Callable[..., dict[str, np.ndarray]], *,
                   image_size: int, channels: int, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Decode raw batches in this process with ``decode`` (e.g. :func:`decode_batch`), keep the rows that
    decoded (``ok``) and stack them: ``(images uint8 [N, C, S, S], labels int64 [N])``, empty arrays for none."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in batches:
        out = decode(batch, image_size=image_size, channels=channels, **kwargs)
        images.append(out["image"][out["ok"]])
        labels.append(out["label"][out["ok"]])
    if not images:
        return np.zeros((0, channels, image_size, image_size), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.concatenate(images), np.concatenate(labels)
