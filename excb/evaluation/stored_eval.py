"""The evaluation metrics of :mod:`excb.evaluation.evaluate` computed from stored features (a
:class:`excb.evaluation.features.FeatureSet` per split), with memory set by block sizes, not by the dataset.

- weighted kNN (k, T, cosine) over Ray tasks that stream the train features in blocks
  (:func:`excb.evaluation.distributed_knn.knn_distributed`);
- the linear probe: full-batch L-BFGS on the loaded features (:func:`excb.evaluation.metrics.linear_probe_top1`,
  the same number as the in-memory evaluation) when the train features take at most ``eval.linear_in_memory_mb``,
  otherwise mini-batch SGD streaming them (:func:`excb.evaluation.linear.streaming_linear_top1`);
- the train split's cluster health from streamed assignment counts n_k: shares p_k = n_k / N;
- NMI, ARI and cluster accuracies of the test split's assignments (one int64 per image, held in memory).

Without labels on a split, kNN, the probe and the label-based clustering scores are skipped with a message
saying why; the cluster health still runs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from excb import console
from excb.config import ExcbConfig
from excb.evaluation.distributed_knn import knn_distributed
from excb.evaluation.features import FeatureSet
from excb.evaluation.linear import streaming_linear_top1
from excb.evaluation.metrics import (
    ari,
    cluster_acc_hungarian,
    cluster_acc_majority,
    linear_probe_top1,
    nmi,
    share_stats,
)

log = logging.getLogger(__name__)

__all__ = ["assignment_counts", "evaluate_stored", "labels_and_assignments", "unlabelled_reason"]


def assignment_counts(features: FeatureSet, num_prototypes: int, block_rows: int = 65536) -> Tensor:
    """n_k = #{i : argmax_k z_ik = k} over the stored split, one block at a time (float64 [K])."""
    counts = torch.zeros(num_prototypes, dtype=torch.float64)
    for table in features.iter_tables(["assignment"], block_rows):
        a = torch.from_numpy(np.array(table["assignment"].to_numpy(), dtype=np.int64))  # a writable copy
        counts += torch.bincount(a, minlength=num_prototypes)[:num_prototypes].double()
    return counts


def labels_and_assignments(features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """Labels and assignments of every stored row (int64 [N] each, file order)."""
    labels, assign = [], []
    for table in features.iter_tables(["label", "assignment"]):
        labels.append(np.asarray(table["label"].to_numpy(), dtype=np.int64))
        assign.append(np.asarray(table["assignment"].to_numpy(), dtype=np.int64))
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(labels), np.concatenate(assign)


def unlabelled_reason(train: FeatureSet, test: FeatureSet) -> str | None:
    """Why kNN and the linear probe cannot run (a split without labels, or empty), or None."""
    missing = [s.split for s in (train, test) if not s.labelled]
    if missing:
        return f"the {' and '.join(missing)} split has no labels"
    return None


def _linear_top1(train: FeatureSet, test: FeatureSet, cfg: ExcbConfig) -> tuple[float, str]:
    """The probe's top-1 and which fit ran: "lbfgs" (features loaded) or "streaming_sgd"."""
    e = cfg.eval
    num_classes = max(train.num_classes, test.num_classes)
    if train.rows * train.dim * 4 <= e.linear_in_memory_mb * 2**20:
        _, xtr, ytr, _ = train.load()
        _, xte, yte, _ = test.load()
        return linear_probe_top1(xtr, ytr, xte, yte, weight_decay=e.linear_weight_decay,
                                 max_iter=e.linear_max_iter), "lbfgs"

    def blocks(split: FeatureSet):  # type: ignore[no-untyped-def]
        return lambda: ((x, y) for x, y, _ in split.blocks(e.knn_block_rows))

    top1 = streaming_linear_top1(blocks(train), blocks(test), num_classes, epochs=e.linear_stream_epochs,
                                 lr=e.linear_stream_lr, batch_size=e.linear_stream_batch_size,
                                 weight_decay=e.linear_weight_decay, seed=cfg.train.seed)
    return top1, "streaming_sgd"


def evaluate_stored(train: FeatureSet, test: FeatureSet, cfg: ExcbConfig, *, linear_probe: bool = True,
                    workers: int = 2, num_cpus_per_task: float = 1.0) -> dict[str, Any]:
    """The keys of :func:`excb.evaluation.evaluate.evaluate_features` from stored features: ``knn_top1``
    (over ``workers`` Ray tasks), ``linear_top1`` (with ``linear_probe``) and ``linear_fit``, NMI / ARI /
    cluster accuracies of the test assignments, the train split's cluster health, and the memory of the kNN
    tasks (``knn_task_peak_rss_mb``: the largest peak RSS; ``knn_task_growth_mb``: the largest growth inside a
    task). An unlabelled split gives ``labels_missing`` (the reason) instead of the label-based keys."""
    e = cfg.eval
    k = cfg.model.num_prototypes
    out: dict[str, Any] = {}
    reason = unlabelled_reason(train, test)
    if reason is None:
        result = knn_distributed(train, test, k=e.knn_k, temperature=e.knn_temperature, workers=workers,
                                 block_rows=e.knn_block_rows, max_chunk_rows=e.knn_max_chunk_rows,
                                 num_cpus_per_task=num_cpus_per_task)
        out["knn_top1"] = result.top1
        out["knn_task_peak_rss_mb"] = max(result.peak_rss_bytes) / 2**20
        # growth inside the task (peak − RSS at its start): what the kNN itself needs, without what the reused
        # worker process already held from earlier tasks
        out["knn_task_growth_mb"] = max(t.peak_rss - t.start_rss for t in result.tasks) / 2**20
        if linear_probe:
            out["linear_top1"], out["linear_fit"] = _linear_top1(train, test, cfg)
        y, a = labels_and_assignments(test)
        out.update(nmi=nmi(a, y), ari=ari(a, y), cluster_acc_hungarian=cluster_acc_hungarian(a, y),
                   cluster_acc_majority=cluster_acc_majority(a, y))
    else:
        out["labels_missing"] = reason
        console.info(f"kNN and the linear probe skipped: {reason} (label -1); cluster health still computed")
    counts = assignment_counts(train, k)
    out.update(share_stats(counts / counts.sum().clamp_min(1.0)))
    return out
