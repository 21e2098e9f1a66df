"""DINO's weighted kNN over stored features (:class:`~excb.evaluation.features.FeatureSet`) spread over Ray tasks,
with memory set by the chunk and block sizes, not by the number of train or test rows.

With test features q_j and train features x_i, both L2-normalised, the cosine similarity is
s_ij = ⟨q_j, x_i⟩ / (‖q_j‖ ‖x_i‖); the neighbours N_k(j) are the k train rows of largest s_ij, each weighted
w_ij = exp(s_ij / T), and the vote of class c is

    score_j(c) = Σ_{i ∈ N_k(j), y_i = c} w_ij,        ŷ_j = argmax_c score_j(c),

top-1 = 100 · #{j : ŷ_j = y_j} / N_test (k = 20, T = 0.07 in DINO).

The test rows are cut into chunks (contiguous row ranges of the stored files), one Ray task each. A task reads its
chunk, then streams the train Parquet files ``block_rows`` rows at a time, keeping a running top-k per test row
(:func:`excb.evaluation.knn.blockwise_neighbours`: the top-k of the union of blocks is the top-k of each block's
top-k merged with the running one). The driver votes (:func:`excb.evaluation.knn.knn_votes`) on each chunk's
neighbours as they arrive, holding only one chunk's k similarities and labels at a time. A task's memory is its
chunk (rows × D floats), one train block (block_rows × D), a similarity tile (test_chunk × block_rows) and the
running top-k (rows × k); none of them grows with the train split.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Self

import numpy as np
import torch
from torch import Tensor

from excb.evaluation.features import FeatureSet, _matrix
from excb.evaluation.knn import Neighbours, blockwise_neighbours, knn_votes

__all__ = ["DistributedKnn", "PeakRss", "TaskStats", "chunk_rows", "knn_distributed", "knn_top1_distributed"]

Segment = tuple[int, int, int]  # (file index, first row, end row) within one stored file


def _rss_reader() -> Callable[[], int]:
    """This process's resident set size in bytes: psutil's, or /proc/self/statm where psutil is missing (it is a
    test extra, not a dependency), or 0."""
    try:
        import psutil

        proc = psutil.Process()
        return lambda: int(proc.memory_info().rss)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

        def statm() -> int:
            try:
                with open("/proc/self/statm") as f:
                    return int(f.read().split()[1]) * page
            except OSError:
                return 0

        return statm


class PeakRss:
    """Peak resident set size (bytes) of this process while the ``with`` block runs, sampled (psutil) every
    ``interval_s`` seconds and at entry and exit; ``start`` is the RSS at entry."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._rss = _rss_reader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak = max(self.peak, self._rss())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> Self:
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


@dataclass
class TaskStats:
    """One kNN task: its test ``rows``, RSS at its start and peak RSS while it ran (bytes), its time, and the pid
    of the process it ran in."""

    rows: int
    start_rss: int
    peak_rss: int
    seconds: float
    pid: int = 0


@dataclass
class DistributedKnn:
    """Weighted kNN top-1 (percent) over ``rows`` test rows (``correct`` of them right) and the tasks' stats."""

    top1: float
    rows: int
    correct: int
    tasks: list[TaskStats] = field(default_factory=list)

    @property
    def peak_rss_bytes(self) -> list[int]:
        """Peak resident memory of every task (bytes), in chunk order."""
        return [t.peak_rss for t in self.tasks]


def chunk_rows(file_rows: list[int], chunks: int) -> list[list[Segment]]:
    """Cut the rows of files with ``file_rows`` rows (in file order) into ``chunks`` contiguous ranges of sizes
    differing by at most one, each given as segments (file index, first row, end row); empty ranges are dropped."""
    total = sum(file_rows)
    chunks = max(1, min(chunks, total))
    bounds = [total * c // chunks for c in range(chunks + 1)]
    out: list[list[Segment]] = []
    for lo, hi in itertools.pairwise(bounds):
        segments, offset = [], 0
        for f, n in enumerate(file_rows):
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                segments.append((f, a - offset, b - offset))
            offset += n
        if segments:
            out.append(segments)
    return out


def _read_segments(test: FeatureSet, segments: list[Segment]) -> tuple[Tensor, Tensor]:
    """Features [n, D] and labels [n] of the given row ranges, reading one file at a time."""
    feats, labels = [], []
    for f, a, b in segments:
        table = test.read_file(f, ["label", "feature"]).slice(a, b - a)
        feats.append(torch.from_numpy(_matrix(table["feature"], test.dim)))
        labels.append(torch.from_numpy(np.array(table["label"].to_numpy(), dtype=np.int64)))
    return torch.cat(feats), torch.cat(labels)


def _train_blocks(train: FeatureSet, block_rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    for feats, labels, _ in train.blocks(block_rows):
        yield feats, labels


def knn_chunk(train: FeatureSet, test: FeatureSet, segments: list[Segment], k: int, block_rows: int,
              test_chunk: int) -> tuple[Tensor, Tensor, Tensor, TaskStats]:
    """One task's work: the k nearest train rows (cosine) of the test rows in ``segments``, streaming the train
    split ``block_rows`` rows at a time. Returns (similarities [n, k], neighbour labels [n, k], test labels [n],
    stats)."""
    t0 = time.perf_counter()
    with PeakRss() as rss:
        feats, labels = _read_segments(test, segments)
        nb = blockwise_neighbours(feats, _train_blocks(train, block_rows), k, test_chunk)
        del feats
    return nb.sims, nb.labels, labels, TaskStats(rows=int(labels.numel()), start_rss=rss.start,
                                                 peak_rss=rss.peak, seconds=time.perf_counter() - t0,
                                                 pid=os.getpid())


def _check(train: FeatureSet, test: FeatureSet) -> None:
    if train.dim != test.dim:
        raise ValueError(f"train and test features differ in dimension: {train.dim} vs {test.dim}")
    missing = [s.split for s in (train, test) if not s.labelled]
    if missing:
        raise ValueError(f"kNN needs labels on both splits; {' and '.join(missing)} has unlabelled rows (label -1)")
    if train.rows == 0 or test.rows == 0:
        raise ValueError(f"kNN needs rows on both splits (train {train.rows}, test {test.rows})")


def knn_distributed(train: FeatureSet, test: FeatureSet, *, k: int = 20, temperature: float = 0.07,
                    workers: int = 2, block_rows: int = 8192, test_chunk: int = 4096,
                    max_chunk_rows: int | None = None, num_cpus_per_task: float = 1.0) -> DistributedKnn:
    """Weighted kNN top-1 of ``test`` against ``train`` (see the module docstring for the equations) in Ray tasks,
    with each task's peak RSS.

    The test rows are cut into ``workers`` chunks (more, of at most ``max_chunk_rows`` rows, when that is given,
    so a task's memory does not grow with the test split either), at most ``workers`` tasks running at a time,
    each using ``num_cpus_per_task`` CPUs. The tasks run in worker processes of their own (a runtime environment
    that only this call's tasks have, so Ray starts new workers for them instead of reusing those that ran the
    feature extraction or other tasks): a reused worker keeps the heap and the object-store pages its earlier
    tasks touched, and its resident memory would then grow with the data those tasks read.

    Raises:
        ValueError: a split is unlabelled or empty, or the feature dimensions differ.
    """
    _check(train, test)
    import ray

    if workers < 1 or block_rows < 1:
        raise ValueError(f"workers and block_rows must be positive, got {workers} and {block_rows}")
    n_chunks = workers if not max_chunk_rows else max(workers, math.ceil(test.rows / max_chunk_rows))
    chunks = chunk_rows(test.file_rows(), n_chunks)
    own_workers = {"env_vars": {"EXCB_KNN_POOL": uuid.uuid4().hex}}
    remote = ray.remote(knn_chunk).options(num_cpus=num_cpus_per_task, num_returns=1, runtime_env=own_workers)
    train_ref, test_ref = ray.put(train), ray.put(test)
    pending: dict[ray.ObjectRef, int] = {}
    stats: dict[int, TaskStats] = {}
    correct = rows = 0
    next_chunk = 0
    while next_chunk < len(chunks) or pending:
        while next_chunk < len(chunks) and len(pending) < workers:
            ref = remote.remote(train_ref, test_ref, chunks[next_chunk], k, block_rows, test_chunk)
            pending[ref] = next_chunk
            next_chunk += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        sims, labels, truth, stats[index] = ray.get(done[0])
        neighbours = Neighbours(sims, labels)
        num_classes = int(labels.max().item()) + 1  # classes no neighbour has get no vote: the argmax is the same
        predicted = knn_votes(neighbours, num_classes, temperature).argmax(dim=1)
        correct += int((predicted == truth).sum().item())
        rows += int(truth.numel())
    return DistributedKnn(top1=100.0 * correct / rows, rows=rows, correct=correct,
                          tasks=[stats[i] for i in sorted(stats)])


def knn_top1_distributed(train: FeatureSet, test: FeatureSet, *, k: int = 20, temperature: float = 0.07,
                         workers: int = 2, block_rows: int = 8192) -> float:
    """Weighted kNN top-1 (percent): 100 · #{j : argmax_c Σ_{i ∈ N_k(j), y_i = c} exp(s_ij / T) = y_j} / N_test,
    s_ij the cosine similarity of test row j and train row i and N_k(j) its k most similar train rows, computed
    by :func:`knn_distributed` over ``workers`` Ray tasks streaming the train features ``block_rows`` rows at a
    time."""
    return knn_distributed(train, test, k=k, temperature=temperature, workers=workers, block_rows=block_rows).top1
