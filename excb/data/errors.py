"""Exceptions raised by the :mod:`excb.data` package."""

from __future__ import annotations

__all__ = ["CorruptImageError", "DatasetNotFoundError", "ShardReadError"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset (raw files or prepared shards) could not be found.

    The message always says where we looked and how to obtain the data.
    """


class CorruptImageError(ValueError):
    """An encoded image could not be decoded (raised in strict mode)."""


class ShardReadError(OSError):
    """A Parquet shard could not be read after every retry.

    The message names the shard's full path or URI and the last error.
    """
