"""The raw data formats read in place (no ``excb prepare``) and the format checks, under their historical import
path: a thin re-export of :mod:`excb.data.image_folder`, :mod:`excb.data.webdataset`,
:mod:`excb.data.raw_layout`, :mod:`excb.data.image_files` and the format registry :mod:`excb.data.registry`.
"""

from __future__ import annotations

from excb.data.image_files import IMAGE_SUFFIXES
from excb.data.image_folder import (
    FolderListing,
    decode_folder_batch,
    list_image_folder,
    load_folder_arrays,
    read_image_folder,
    train_classes,
)
from excb.data.raw_layout import split_folder
from excb.data.registry import FORMATS, detect_format, require_split
from excb.data.webdataset import (
    count_webdataset_samples,
    decode_webdataset_batch,
    list_tars,
    load_webdataset_arrays,
    read_webdataset,
)

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "FolderListing",
    "count_webdataset_samples",
    "decode_folder_batch",
    "decode_webdataset_batch",
    "detect_format",
    "list_image_folder",
    "list_tars",
    "load_folder_arrays",
    "load_webdataset_arrays",
    "read_image_folder",
    "read_webdataset",
    "require_split",
    "split_folder",
    "train_classes",
]
