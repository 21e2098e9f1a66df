"""Data preparation and loading for ExCB: Fashion-MNIST / image folders → shards → Ray Data."""

from __future__ import annotations

from excb.data.decode import decode_batch, decode_image
from excb.data.errors import CorruptImageError, DatasetNotFoundError, ShardReadError
from excb.data.fashion_mnist import (
    CLASSES as FASHION_MNIST_CLASSES,
)
from excb.data.fashion_mnist import (
    load_fashion_mnist,
    read_idx_images,
    read_idx_labels,
)
from excb.data.pipeline import (
    DecodedSplit,
    decoded_split,
    load_split_arrays,
    read_split,
)
from excb.data.prepare import prepare_fashion_mnist, prepare_image_folder
from excb.data.shards import (
    FORMAT,
    list_shards,
    read_meta,
    resolve_fs,
    shards_exist,
    verify_shards,
    write_meta,
    write_split,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FORMAT",
    "CorruptImageError",
    "DatasetNotFoundError",
    "DecodedSplit",
    "ShardReadError",
    "decode_batch",
    "decode_image",
    "decoded_split",
    "list_shards",
    "load_fashion_mnist",
    "load_split_arrays",
    "prepare_fashion_mnist",
    "prepare_image_folder",
    "read_idx_images",
    "read_idx_labels",
    "read_meta",
    "read_split",
    "resolve_fs",
    "shards_exist",
    "verify_shards",
    "write_meta",
    "write_split",
]
