"""Which files are images, and listing / reading image files: the one image-file rule of :mod:`excb.data`.

An image file has the extension .jpg .jpeg .png .bmp or .webp in any case (:data:`IMAGE_EXTENSIONS`, the single
source; :data:`IMAGE_SUFFIXES` is the same set without dots, as Ray Data's ``file_extensions`` and WebDataset member
suffixes spell it). Whether names starting with ``.`` or ``_`` are skipped (as Ray Data's file readers skip them) is
the caller's explicit choice (``skip_hidden``): the raw-format checks skip them, the recursive listing of an image
tree (:func:`group_images`, used by ``excb prepare images`` and the image-folder listing) does not.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from excb.data.decode import chunks

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_SUFFIXES",
    "group_images",
    "interleave",
    "is_hidden",
    "is_image_file",
    "is_image_suffix",
    "read_files",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
IMAGE_SUFFIXES: tuple[str, ...] = tuple(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))  # bmp jpeg jpg png webp
READ_THREADS = 16  # parallel reads of image files (object stores answer each GET slowly)
_READ_CHUNK = 256


def is_hidden(base_name: str) -> bool:
    """True for a base name starting with ``.`` or ``_`` (files Ray Data's readers ignore)."""
    return base_name.startswith((".", "_"))


def is_image_suffix(suffix: str) -> bool:
    """True if ``suffix`` (an extension without its dot, e.g. a WebDataset member suffix) is an image's, any case."""
    return suffix.lower() in IMAGE_SUFFIXES


def is_image_file(base_name: str, *, skip_hidden: bool) -> bool:
    """True if the file ``base_name`` is an image by its extension; with ``skip_hidden``, hidden names
    (:func:`is_hidden`) are not."""
    if skip_hidden and is_hidden(base_name):
        return False
    return is_image_suffix(posixpath.splitext(base_name)[1][1:])


def group_images(infos: Iterable[pafs.FileInfo], folder: str) -> tuple[list[str], dict[str, list[str]]]:
    """From a recursive listing of ``folder``: (sorted images directly in it, {class folder: sorted image
    paths}) — the first path component below ``folder`` names the class. Hidden names are not skipped."""
    flat: list[str] = []
    by_class: dict[str, list[str]] = {}
    prefix = folder.rstrip("/") + "/"
    for info in infos:
        if info.type != pafs.FileType.File or not is_image_file(info.base_name, skip_hidden=False):
            continue
        rel = info.path[len(prefix) :] if info.path.startswith(prefix) else info.base_name
        if "/" in rel:
            by_class.setdefault(rel.split("/", 1)[0], []).append(info.path)
        else:
            flat.append(info.path)
    return sorted(flat), {c: sorted(p) for c, p in sorted(by_class.items())}


def interleave(by_class: dict[str, list[str]]) -> Iterator[tuple[str, str]]:
    """Yield ``(class, path)`` round-robin over classes, so any prefix is balanced."""
    lists = list(by_class.items())
    longest = max((len(p) for _, p in lists), default=0)
    for i in range(longest):
        for cls, paths in lists:
            if i < len(paths):
                yield cls, paths[i]


def read_files(fs: pafs.FileSystem, paths: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(path, bytes)`` in order, reading with a small thread pool (for object stores)."""

    def read(path: str) -> tuple[str, bytes]:
        """One file's bytes."""
        with fs.open_input_stream(path) as f:
            return path, f.read()

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for chunk in chunks(paths, _READ_CHUNK):
            yield from pool.map(read, chunk)
