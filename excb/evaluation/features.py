"""Frozen teacher features of a whole split, extracted with Ray Data and stored as Parquet under the run directory.

``extract_split_features`` runs the teacher of one checkpoint over a decoded split (any data format, local or
object storage) in a pool of Ray Data actors, each loading the model once, and writes one row per image::

    id          string                      the data set's row id
    label       int64                       -1 for an unlabelled split
    feature     fixed_size_list<float32>[D] backbone output f(x) of the evaluation view
    assignment  int64                       argmax_k z_k, z_k = cos(g(f(x)), v_k) (projector g, prototypes v_k)

into ``RUN/features/<sha256[:16]>/<split>/`` (``<split>-first<N>`` for the first N rows only), the features of
:func:`excb.evaluation.evaluate.extract_features` (whole image at eval decode, network in eval mode). A JSON
marker, ``features.json``, is written last and atomically: the checkpoint's SHA-256, data path, rows, feature
dim and file names. A later call for the same checkpoint and data reuses the files without starting Ray; a marker
written for another checkpoint (or data path, limit) makes the folder be removed and the features recomputed.

:class:`FeatureSet` reads them back one Parquet file (or ``block_rows`` rows) at a time, so block-wise kNN and
linear probes never hold a whole split in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import Tensor

from excb.config import ExcbConfig
from excb.method.model import ExcbNetwork

log = logging.getLogger(__name__)

__all__ = [
    "MARKER_FILE",
    "BackboneMismatchError",
    "FeatureSet",
    "extract_split_features",
    "feature_folder",
    "load_teacher",
    "open_feature_set",
]

MARKER_FILE = "features.json"
FEATURES_DIR = "features"
MARKER_VERSION = 1


class BackboneMismatchError(ValueError):
    """A checkpoint's teacher weights are not those of the backbone its configuration names."""


def _schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("label", pa.int64()), ("feature", pa.list_(pa.float32(), dim)),
                      ("assignment", pa.int64())])


def features_table(ids: Any, labels: Any, feats: Tensor, assign: Tensor) -> pa.Table:
    """The stored columns for one batch: ``id`` (string), ``label`` (int64), ``feature`` (fixed-size list of
    float32 [D]) and ``assignment`` (int64)."""
    f = feats.detach().float().cpu().numpy()
    n, dim = f.shape
    return pa.table({
        "id": pa.array([str(i) for i in ids], type=pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64).reshape(n)),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1), type=pa.float32()), dim),
        "assignment": pa.array(assign.detach().cpu().numpy().astype(np.int64).reshape(n)),
    }, schema=_schema(dim))


def _matrix(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A (fixed-size) list column of float32 as a writable [n, dim] array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    out = flat.reshape(-1, dim) if dim else np.zeros((len(column), 0), np.float32)
    return out if out.flags.writeable else out.copy()


def _tensor(column: pa.Array | pa.ChunkedArray) -> Tensor:
    arr = column.to_numpy(zero_copy_only=False) if isinstance(column, pa.Array) else column.to_numpy()
    return torch.from_numpy(np.array(arr, dtype=np.int64, copy=True))


@dataclass(frozen=True)
class FeatureSet:
    """Stored features of one split: ``folder`` (local path or URI) holding ``files`` (Parquet file names, read
    in this order), ``rows`` rows of ``dim`` features, the checkpoint's ``sha256``, and the label range
    (``labelled``: every label ≥ 0; ``num_classes`` = max label + 1, 0 when unlabelled).

    ``filesystem`` (not compared, not shown) is the filesystem to read with, resolved where the set was made so
    that Ray tasks elsewhere need no storage configuration of their own (None: resolved from ``folder``)."""

    folder: str
    rows: int
    dim: int
    split: str
    sha256: str
    files: tuple[str, ...]
    labelled: bool
    num_classes: int
    filesystem: pafs.FileSystem | None = field(default=None, repr=False, compare=False)

    def _fs_path(self) -> tuple[pafs.FileSystem, str]:
        """The filesystem and the folder's path on it (with ``filesystem`` set, the URI is not resolved again: a Ray
        worker has no storage options of its own)."""
        from excb.storage import resolve_fs

        if self.filesystem is None:
            return resolve_fs(self.folder)
        if "://" in self.folder:
            parts = urlsplit(self.folder)
            return self.filesystem, (parts.netloc + parts.path).rstrip("/")
        return self.filesystem, os.path.abspath(self.folder)

    def file_rows(self) -> list[int]:
        """Rows of every file, from the Parquet footers (no data read)."""
        fs, path = self._fs_path()
        out = []
        for name in self.files:
            with fs.open_input_file(posixpath.join(path, name)) as f:
                out.append(pq.ParquetFile(f).metadata.num_rows)
        return out

    def read_file(self, index: int, columns: list[str] | None = None) -> pa.Table:
        """The ``index``-th stored file (of :attr:`files`) as one Arrow table."""
        fs, path = self._fs_path()
        with fs.open_input_file(posixpath.join(path, self.files[index])) as f:
            return pq.ParquetFile(f).read(columns=columns)

    def iter_tables(self, columns: list[str] | None = None, block_rows: int | None = None) -> Iterator[pa.Table]:
        """The stored rows as Arrow tables, one file at a time (``block_rows``: at most that many rows at a time,
        read by record batches)."""
        fs, path = self._fs_path()
        for name in self.files:
            with fs.open_input_file(posixpath.join(path, name)) as f:
                pf = pq.ParquetFile(f)
                if block_rows is None:
                    yield pf.read(columns=columns)
                else:
                    for batch in pf.iter_batches(batch_size=block_rows, columns=columns):
                        yield pa.Table.from_batches([batch])

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(features float32 [n, D], labels int64 [n], assignments int64 [n])`` per file (or per ``block_rows``
        rows): peak memory is one block, whatever the number of rows."""
        for t in self.iter_tables(["label", "feature", "assignment"], block_rows):
            yield (torch.from_numpy(_matrix(t["feature"], self.dim)), _tensor(t["label"]),
                   _tensor(t["assignment"]))

    def load(self) -> tuple[list[str], Tensor, Tensor, Tensor]:
        """Everything in memory, in file order: ``(ids, features [N, D], labels [N], assignments [N])`` (for small
        sets and tests; use :meth:`blocks` otherwise)."""
        ids: list[str] = []
        feats, labels, assign = [], [], []
        for t in self.iter_tables():
            ids.extend(t["id"].to_pylist())
            feats.append(torch.from_numpy(_matrix(t["feature"], self.dim)))
            labels.append(_tensor(t["label"]))
            assign.append(_tensor(t["assignment"]))
        if not feats:
            return [], torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return ids, torch.cat(feats), torch.cat(labels), torch.cat(assign)


# ---------------------------------------------------------------------------------------------------------------
# The teacher, with a clear error when its weights are not the configured backbone's


def _backbone_shapes(weights: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k[len("backbone."):]: tuple(v.shape) for k, v in weights.items() if k.startswith("backbone.")}


def _candidate_shapes(name: str, cfg: ExcbConfig) -> dict[str, tuple[int, ...]] | None:
    """Parameter and buffer shapes of backbone ``name`` built (on the meta device: no memory) with the config's
    options; None if it cannot be built so."""
    from excb.method.backbones import build_backbone

    m = cfg.model
    try:
        with torch.device("meta"):
            net = build_backbone(name, cfg.data.channels, convnet_widths=tuple(m.convnet_widths),
                                 convnet_pool=m.convnet_pool, image_size=cfg.augment.global_size)
    except Exception:  # noqa: BLE001 - a candidate that does not build is no match
        return None
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _describe_backbone(found: dict[str, tuple[int, ...]], cfg: ExcbConfig) -> str:
    """The registered backbone whose parameter names are exactly ``found``'s (by name), else a description."""
    from excb.method.backbones import BACKBONE_REGISTRY

    candidates = {name: _candidate_shapes(name, cfg) for name in BACKBONE_REGISTRY.names()
                  if name != cfg.model.backbone}
    for name, shapes in candidates.items():  # same names and shapes first, then same names
        if shapes == found:
            return repr(name)
    for name, shapes in candidates.items():
        if shapes is not None and set(shapes) == set(found):
            return f"{name!r} (with other sizes)"
    if found and all(k.startswith("features.") for k in found):
        return "'convnet' (other widths)"
    first = sorted(found)[:3]
    return f"an unrecognised backbone ({len(found)} tensors, e.g. {', '.join(first) or 'none'})"


def check_backbone(state: dict[str, Any], cfg: ExcbConfig, where: str = "checkpoint") -> None:
    """Raise :class:`BackboneMismatchError` naming both backbones when the teacher weights in ``state`` are not
    those of ``cfg.model.backbone`` (different parameter names or shapes)."""
    found = _backbone_shapes(state["teacher"])
    expected = _candidate_shapes(cfg.model.backbone, cfg)
    if expected is None or found == expected:
        return
    name = cfg.model.backbone
    if set(found) == set(expected):
        diff = next(k for k in sorted(expected) if found[k] != expected[k])
        raise BackboneMismatchError(
            f"{where}: the configured backbone is {name!r} (model.backbone) but the checkpoint's teacher weights "
            f"have other shapes: backbone.{diff} is {list(found[diff])} in the checkpoint, {list(expected[diff])} "
            f"for the configured one (model.convnet_widths / data.channels / augment.global_size?)")
    raise BackboneMismatchError(
        f"{where}: the configured backbone is {name!r} (model.backbone) but the checkpoint's teacher weights are "
        f"those of {_describe_backbone(found, cfg)}")


def load_teacher(state: dict[str, Any], where: str = "checkpoint") -> tuple[ExcbNetwork, ExcbConfig]:
    """The teacher network (eval mode) and config of a training state, after :func:`check_backbone`."""
    from excb.config import from_dict
    from excb.method.model import build_student_teacher

    cfg = from_dict(state["config"])
    check_backbone(state, cfg, where)
    _, teacher = build_student_teacher(cfg)
    teacher.load_state_dict(state["teacher"])
    return teacher.eval(), cfg


def _read_state(fs: pafs.FileSystem, path: str, sha256: str) -> dict[str, Any]:
    """``state.pt`` of the checkpoint at ``path`` on ``fs``, verified against ``sha256`` (the driver read it from
    ``state.json``) and loaded with ``torch.load(weights_only=True)``."""
    from excb.rundir.checkpoint import STATE_FILE, CheckpointError

    with fs.open_input_stream(posixpath.join(path, STATE_FILE)) as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CheckpointError(f"checkpoint {path} changed during feature extraction ({digest} != {sha256})")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class TeacherFeatures:
    """The Ray Data callable class: loads the teacher once (in ``__init__``, on the GPU with ``use_gpu``), then maps
    numpy batches (``id``, ``image`` uint8 [n, C, S, S], ``label``) to :func:`features_table` tables."""

    def __init__(self, fs: pafs.FileSystem, path: str, sha256: str, use_gpu: bool = False) -> None:
        from excb.method.augment import MultiCropAugment

        self.net, cfg = load_teacher(_read_state(fs, path, sha256), path)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.net.to(self.device)
        self.augment = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
        self.dim = int(self.net.backbone.out_dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from excb.evaluation.evaluate import extract_features

        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # copies only if read-only
        n = images.shape[0]
        if n == 0:
            return _schema(self.dim).empty_table()
        feats, assign = extract_features(self.net, self.augment, images, batch_size=n)
        return features_table(batch["id"], batch["label"], feats, assign)


# ---------------------------------------------------------------------------------------------------------------
# Folder, marker and reuse


def feature_folder(run_dir: str, sha256: str, split: str, limit: int | None = None) -> str:
    """``RUN/features/<sha256[:16]>/<split>`` (``<split>-first<limit>`` for the first ``limit`` rows only)."""
    from excb.storage import join

    return join(run_dir, FEATURES_DIR, sha256[:16], split if not limit else f"{split}-first{int(limit)}")


def _read_marker(folder: str) -> dict[str, Any] | None:
    from excb.storage import join, read_text

    try:
        marker = json.loads(read_text(join(folder, MARKER_FILE)))
    except (OSError, FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def _from_marker(folder: str, marker: dict[str, Any], fs: pafs.FileSystem | None) -> FeatureSet:
    return FeatureSet(folder=folder, rows=int(marker["rows"]), dim=int(marker["dim"]), split=str(marker["split"]),
                      sha256=str(marker["sha256"]), files=tuple(marker["files"]), labelled=bool(marker["labelled"]),
                      num_classes=int(marker["num_classes"]), filesystem=fs)


def _files_present(folder: str, files: list[str]) -> bool:
    from excb.storage import resolve_fs

    fs, path = resolve_fs(folder)
    infos = fs.get_file_info([posixpath.join(path, n) for n in files])
    return all(i.type == pafs.FileType.File for i in infos)


def open_feature_set(folder: str) -> FeatureSet | None:
    """The feature set stored in ``folder`` if its marker is there and its files are present, else None."""
    from excb.storage import ray_filesystem

    marker = _read_marker(folder)
    if marker is None or marker.get("version") != MARKER_VERSION or not _files_present(folder, marker["files"]):
        return None
    return _from_marker(folder, marker, ray_filesystem(folder))


def _remove_folder(folder: str) -> None:
    from excb.storage import resolve_fs

    fs, path = resolve_fs(folder)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _summarise(folder: str) -> tuple[list[str], int, int, int]:
    """Parquet file names (sorted), rows, min and max label of what Ray wrote into ``folder``."""
    from excb.storage import resolve_fs

    fs, path = resolve_fs(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    rows, lo, hi = 0, None, -1
    for name in names:
        with fs.open_input_file(posixpath.join(path, name)) as f:
            labels = pq.ParquetFile(f).read(columns=["label"])["label"].to_numpy()
        if len(labels):
            rows += len(labels)
            lo = int(labels.min()) if lo is None else min(lo, int(labels.min()))
            hi = max(hi, int(labels.max()))
    return names, rows, -1 if lo is None else lo, hi


def _checkpoint_sha256(checkpoint_dir: str) -> str:
    from excb.rundir.checkpoint import CheckpointError, read_meta

    meta = read_meta(checkpoint_dir)
    if "sha256" not in meta:
        raise CheckpointError(f"checkpoint {checkpoint_dir} is unreadable: its state.json has no sha256")
    return str(meta["sha256"])


def extract_split_features(run_dir: str, checkpoint_dir: str, split: str, *, data_path: str | None = None,
                           concurrency: int = 1, batch_size: int = 256, use_gpu: bool = False,
                           num_cpus_per_actor: float = 1.0, limit: int | None = None,
                           rows_per_file: int | None = 8192) -> FeatureSet:
    """Teacher features of ``split`` for the checkpoint at ``checkpoint_dir``, stored under ``run_dir`` (see the
    module docstring) or reused from an earlier call.

    The split (``data_path``, default the checkpoint config's ``data.path``; format detected) is decoded for
    evaluation (centre crop at ``data.image_size``) by Ray Data and mapped by a pool of ``concurrency``
    :class:`TeacherFeatures` actors (``num_cpus_per_actor`` CPUs, one GPU each with ``use_gpu``) in batches of
    ``batch_size``; files of about ``rows_per_file`` rows are written (a hint to Ray Data; None: its choice), so
    reading one file back costs about rows_per_file × D × 4 bytes. ``limit`` takes
    only the first rows (a quick look; stored apart from the full split's features).

    Reuse: when the folder's marker names this checkpoint's SHA-256, the same data path and limit, and its files
    are present, nothing is computed (and Ray is not started). Otherwise the folder is removed first.

    Raises:
        BackboneMismatchError: the checkpoint's teacher weights are not those of its configured backbone.
        excb.rundir.checkpoint.CheckpointError: the checkpoint is unreadable or fails its checksum.
    """
    from excb.data.pipeline import decoded_split
    from excb.data.registry import detect_format
    from excb.rundir.checkpoint import read_state_dir
    from excb.storage import absolute, join, ray_filesystem, resolve_fs, write_json

    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    run_dir = absolute(run_dir)
    sha256 = _checkpoint_sha256(checkpoint_dir)
    folder = feature_folder(run_dir, sha256, split, limit)

    marker = _read_marker(folder)
    if marker is not None:
        # The checkpoint's hash fixes its config, so without ``data_path`` the marker's config path is the default.
        wanted = absolute(data_path) if data_path else marker.get("config_data_path")
        same = (marker.get("version") == MARKER_VERSION and marker.get("sha256") == sha256
                and marker.get("data_path") == wanted and marker.get("limit") == limit
                and marker.get("split") == split)
        if same and _files_present(folder, marker["files"]):
            log.info("reusing the %s features of checkpoint %s in %s", split, sha256[:16], folder)
            return _from_marker(folder, marker, ray_filesystem(folder))
        log.warning("features in %s were written for %s; recomputing them", folder,
                    f"checkpoint {str(marker.get('sha256'))[:16]}" if marker.get("sha256") != sha256
                    else "other data, another limit or an unfinished write")

    state = read_state_dir(checkpoint_dir)
    if state.get("config") is None or "teacher" not in state:
        raise ValueError(f"checkpoint {checkpoint_dir} holds no teacher and config")
    teacher, cfg = load_teacher(state, checkpoint_dir)  # fails fast, here, on a backbone mismatch
    dim = int(teacher.backbone.out_dim)
    del state, teacher
    path = absolute(data_path or cfg.data.path)
    _remove_folder(folder)

    import ray.data

    fmt = detect_format(path, split)
    decoded = decoded_split(path, split, image_size=cfg.data.image_size, channels=cfg.data.channels, limit=limit,
                            fmt=fmt, materialize=False, rows=0)  # rows: not needed, and costly to count for tars
    ckpt_fs, ckpt_path = resolve_fs(checkpoint_dir)
    # Blocks of one batch, so that every actor of the pool gets work even when the split is read as few blocks.
    mapped = decoded.dataset.repartition(target_num_rows_per_block=batch_size).map_batches(
        TeacherFeatures, fn_constructor_kwargs={"fs": ckpt_fs, "path": ckpt_path, "sha256": sha256,
                                                "use_gpu": use_gpu},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus_per_actor, num_gpus=1 if use_gpu else 0)
    out_fs = ray_filesystem(folder)
    mapped.write_parquet(folder, filesystem=out_fs, min_rows_per_file=rows_per_file, max_rows_per_file=rows_per_file)

    files, rows, lo, hi = _summarise(folder)
    labelled = rows > 0 and lo >= 0
    marker = {"version": MARKER_VERSION, "sha256": sha256, "checkpoint": checkpoint_dir, "split": split,
              "data_path": path, "config_data_path": absolute(cfg.data.path), "format": fmt, "limit": limit, "rows": rows, "dim": dim, "files": files,
              "labelled": labelled, "num_classes": hi + 1 if labelled else 0,
              "image_size": cfg.data.image_size, "channels": cfg.data.channels}
    write_json(join(folder, MARKER_FILE), marker)  # last: its presence says the files are complete
    return _from_marker(folder, marker, out_fs)
