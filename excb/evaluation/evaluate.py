"""Evaluation of a teacher network on frozen backbone features and its prototype assignments.

Features: weighted kNN (DINO protocol) and a linear probe (standardised features, L-BFGS logistic regression),
both train split → test split. Clustering of the test split's assignments argmax_k z_k vs labels: NMI, ARI,
one-to-one (Hungarian) and majority-label cluster accuracy. Cluster health of the train split's assignments:
prototypes used, max/min share × K, normalised entropy. Optionally a 2-D embedding plot of the test features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from excb.config import ExcbConfig
from excb.evaluation.metrics import (
    ari,
    assignment_shares,
    cluster_acc_hungarian,
    cluster_acc_majority,
    knn_top1,
    linear_probe_top1,
    nmi,
    share_stats,
)
from excb.method.augment import MultiCropAugment
from excb.method.model import ExcbNetwork


@torch.no_grad()
def extract_features(net: ExcbNetwork, augment: MultiCropAugment, images: Tensor,
                     batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Backbone features [N, D] and prototype assignments argmax_k z_k [N] of uint8 images [N, C, H, W]
    (whole image at the global crop size, network in eval mode; its mode is restored afterwards)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    feats, assign = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            f = net.backbone_features(augment.plain(images[i:i + batch_size].to(device)))
            z = net.prototypes(net.projector(f))
            feats.append(f.float().cpu())
            assign.append(z.argmax(dim=1).cpu())
    finally:
        net.train(was_training)
    return torch.cat(feats), torch.cat(assign)


def _labelled(y: np.ndarray) -> bool:
    return bool(y.size) and int(y.min()) >= 0


def evaluate_features(train_feats: Tensor, train_assign: Tensor, train_y: np.ndarray, test_feats: Tensor,
                      test_assign: Tensor, test_y: np.ndarray, num_prototypes: int, *, k: int = 20,
                      temperature: float = 0.07, linear_probe: bool = True, linear_weight_decay: float = 1e-4,
                      linear_max_iter: int = 100) -> dict[str, float]:
    """All metrics of :func:`evaluate_teacher` from already extracted features [N, D] and assignments [N].

    With labels on both splits: ``knn_top1`` and (when ``linear_probe``) ``linear_top1`` (percent, train →
    test), and on the test split's assignments ``nmi``, ``ari`` (fractions) and ``cluster_acc_hungarian``,
    ``cluster_acc_majority`` (percent). Always: the train split's cluster health (``prototypes_used``,
    ``max_cluster_share_x_uniform``, ``min_cluster_share_x_uniform``, ``normalized_entropy``)."""
    out: dict[str, float] = {}
    if _labelled(train_y) and _labelled(test_y):
        ytr, yte = torch.from_numpy(np.asarray(train_y)), torch.from_numpy(np.asarray(test_y))
        out["knn_top1"] = knn_top1(train_feats, ytr, test_feats, yte, k, temperature)
        if linear_probe:
            out["linear_top1"] = linear_probe_top1(train_feats, ytr, test_feats, yte,
                                                   weight_decay=linear_weight_decay, max_iter=linear_max_iter)
        a = test_assign.numpy()
        out["nmi"] = nmi(a, test_y)
        out["ari"] = ari(a, test_y)
        out["cluster_acc_hungarian"] = cluster_acc_hungarian(a, test_y)
        out["cluster_acc_majority"] = cluster_acc_majority(a, test_y)
    out.update(share_stats(assignment_shares(train_assign, num_prototypes)))
    return out


def evaluate_teacher(net: ExcbNetwork, augment: MultiCropAugment, train_x: Tensor, train_y: np.ndarray,
                     test_x: Tensor, test_y: np.ndarray, *, k: int = 20, temperature: float = 0.07,
                     linear_probe: bool = True, linear_weight_decay: float = 1e-4,
                     linear_max_iter: int = 100) -> dict[str, float]:
    """kNN top-1 and linear-probe top-1 (train → test; ``linear_probe=False`` skips the probe, e.g. per epoch),
    NMI, ARI and Hungarian / majority-label cluster accuracy of the test assignments vs labels, and the health
    of the train split's prototype assignments; see :func:`evaluate_features` for the keys."""
    ftr, atr = extract_features(net, augment, train_x)
    fte, ate = extract_features(net, augment, test_x)
    return evaluate_features(ftr, atr, train_y, fte, ate, test_y, net.prototypes.weight.shape[0], k=k,
                             temperature=temperature, linear_probe=linear_probe,
                             linear_weight_decay=linear_weight_decay, linear_max_iter=linear_max_iter)


def choose_engine(cfg: ExcbConfig, data_path: str, requested: str, limit: int | None = None) -> str:
    """"memory" or "ray" for ``requested`` (``eval.engine``): auto = memory for prepared shards whose decoded
    train split (rows × C × H × W bytes, rows from the Parquet footers) takes at most ``eval.in_memory_max_mb``,
    ray otherwise (other formats are not counted: a listing of tars can be a data pass)."""
    if requested != "auto":
        return requested
    if cfg.data.format != "shards":
        return "ray"
    from excb.data.pipeline import count_split_rows

    rows = count_split_rows(data_path, "train", "shards", known=cfg.data.train_rows,
                            retries=cfg.storage.read_retries)
    rows = min(rows, limit) if limit else rows
    decoded = rows * cfg.data.channels * cfg.data.image_size ** 2
    return "memory" if decoded <= cfg.eval.in_memory_max_mb * 2**20 else "ray"


def _in_memory(teacher: ExcbNetwork, cfg: ExcbConfig, path: str, limit: int | None,
               linear_probe: bool) -> tuple[dict[str, Any], Tensor, np.ndarray]:
    """Both splits decoded into this process; returns (metrics, test features, test labels)."""
    from excb.data.pipeline import load_split_arrays

    kw = dict(image_size=cfg.data.image_size, channels=cfg.data.channels, limit=limit)
    train_x, train_y = load_split_arrays(path, "train", **kw)
    test_x, test_y = load_split_arrays(path, "test", **kw)
    augment = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    torch.set_num_threads(cfg.train.torch_threads or torch.get_num_threads())
    ftr, atr = extract_features(teacher, augment, torch.from_numpy(train_x))
    fte, ate = extract_features(teacher, augment, torch.from_numpy(test_x))
    if not (_labelled(train_y) and _labelled(test_y)):
        from excb import console

        missing = [s for s, y in (("train", train_y), ("test", test_y)) if not _labelled(y)]
        console.info(f"kNN and the linear probe skipped: the {' and '.join(missing)} split has no labels "
                     "(label -1); cluster health still computed")
    out: dict[str, Any] = evaluate_features(
        ftr, atr, train_y, fte, ate, test_y, teacher.prototypes.weight.shape[0], k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature, linear_probe=linear_probe,
        linear_weight_decay=cfg.eval.linear_weight_decay, linear_max_iter=cfg.eval.linear_max_iter)
    out.update(eval_train_rows=int(len(train_x)), eval_test_rows=int(len(test_x)))
    if cfg.eval.reference_scores and _labelled(train_y) and _labelled(test_y):
        out.update(_references(cfg, path, train_x, train_y, test_x, test_y, limit, linear_probe))
    return out, fte, test_y


def _references(cfg: ExcbConfig, path: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                test_y: np.ndarray, limit: int | None, linear_probe: bool) -> dict[str, float]:
    """Raw-pixel and untrained-network scores (:mod:`excb.evaluation.reference`); none when the train split's
    pixels as float32 would take more than ``eval.linear_in_memory_mb`` (the probe's in-memory budget)."""
    from excb import console
    from excb.evaluation.reference import reference_scores

    pixels_mb = len(train_x) * cfg.data.channels * cfg.augment.global_size ** 2 * 4 / 2**20
    if pixels_mb > cfg.eval.linear_in_memory_mb:
        console.info(f"reference scores skipped: the train split's pixels take {pixels_mb:.0f} MB as float32 "
                     f"(eval.linear_in_memory_mb = {cfg.eval.linear_in_memory_mb:g})")
        return {}
    return reference_scores(cfg, path, torch.from_numpy(train_x), train_y, torch.from_numpy(test_x), test_y,
                            limit=limit, linear_probe=linear_probe)


def _with_ray(run_dir: str, checkpoint: str, cfg: ExcbConfig, path: str, limit: int | None,
              linear_probe: bool, plot_points: int) -> tuple[dict[str, Any], Tensor, np.ndarray]:
    """Features extracted by Ray Data actors into RUN/features/ (or reused), then
    :func:`excb.evaluation.stored_eval.evaluate_stored`; returns (metrics, up to ``plot_points`` test features
    and their labels)."""
    import ray

    from excb.evaluation.features import extract_split_features
    from excb.evaluation.stored_eval import evaluate_stored
    from excb.run.startup import init_ray

    init_ray()
    resources = ray.cluster_resources()
    workers = cfg.eval.feature_workers or cfg.train.max_workers
    use_gpu = cfg.train.use_gpu and resources.get("GPU", 0) >= 1
    # one CPU stays free for Ray Data's read/decode tasks (each asks for 1): otherwise the actors hold every CPU of a
    # small machine and the pass never starts
    spare = max(resources.get("CPU", 2.0) - 1.0, 0.5)
    workers = max(1, min(workers, int(spare / 0.25)))
    cpus = min(float(cfg.train.cpus_per_worker), spare / workers)
    kw = dict(data_path=path, concurrency=workers, batch_size=cfg.eval.feature_batch_size, use_gpu=use_gpu,
              num_cpus_per_actor=cpus, limit=limit)
    train = extract_split_features(run_dir, checkpoint, "train", **kw)
    test = extract_split_features(run_dir, checkpoint, "test", **kw)
    out = evaluate_stored(train, test, cfg, linear_probe=linear_probe, workers=workers, num_cpus_per_task=cpus)
    out.update(eval_train_rows=train.rows, eval_test_rows=test.rows, features=[train.folder, test.folder])
    feats, labels = [], []
    for f, y, _ in test.blocks(min(plot_points, 65536)) if plot_points > 0 else ():
        feats.append(f)
        labels.append(y)
        if sum(len(x) for x in feats) >= plot_points:
            break
    fte = torch.cat(feats)[:plot_points] if feats else torch.zeros(0, test.dim)
    yte = torch.cat(labels)[:plot_points].numpy() if labels else np.zeros(0, dtype=np.int64)
    return out, fte, yte


def evaluate_run(run_dir: str, data_path: str | None = None, *, plot: str | None = None,
                 plot_points: int = 5000, linear_probe: bool | None = None, limit: int | None = None,
                 engine: str | None = None, knn_only: bool = False) -> dict[str, Any]:
    """Full evaluation of a run's newest good checkpoint on all train and test rows (the first ``limit`` of each
    split when given: a quick look): kNN, linear probe (unless ``eval.linear_probe`` / ``linear_probe`` is off,
    or ``knn_only``), NMI, ARI, cluster accuracies, cluster health of the train split's assignments and the size
    estimate's health. ``engine`` (default ``eval.engine``; see :func:`choose_engine`): "memory" decodes both
    splits into this process, "ray" extracts features with Ray Data into RUN/features/ and evaluates them
    block-wise (any dataset size). ``plot`` ("pca" or "tsne") also draws at most ``plot_points`` test features in
    2-D, coloured by label, into RUN_DIR/plots/embedding_<method>.png (its path is returned as
    ``embedding_plot``).

    Raises:
        excb.evaluation.features.BackboneMismatchError: the checkpoint's teacher is not the configured backbone.
        excb.rundir.checkpoint.CheckpointError: no checkpoint verifies.
    """
    from excb.evaluation.features import load_teacher
    from excb.evaluation.metrics import estimate_stats
    from excb.rundir.checkpoint import list_checkpoints, load_latest
    from excb.storage import join

    state, where = load_latest(list_checkpoints(run_dir))
    teacher, cfg = load_teacher(state, where)
    path = data_path or cfg.data.path
    chosen = choose_engine(cfg, path, engine or cfg.eval.engine, limit)
    if chosen not in ("memory", "ray"):
        raise ValueError(f"engine must be auto, memory or ray, got {chosen!r}")
    probe = (cfg.eval.linear_probe if linear_probe is None else linear_probe) and not knn_only
    if chosen == "memory":
        out, fte, test_y = _in_memory(teacher, cfg, path, limit, probe)
    else:
        del teacher
        out, fte, test_y = _with_ray(run_dir, where, cfg, path, limit, probe, plot_points if plot else 0)
    out.update(estimate_stats(state["balancer"]["sizes"]))
    out.update(epochs=int(state["epoch"]), steps=int(state["step"]), checkpoint=where, eval_engine=chosen)
    if plot:
        from excb.evaluation.embedding import plot_embedding

        out["embedding_plot"] = plot_embedding(fte, test_y, join(run_dir, "plots", f"embedding_{plot}.png"),
                                               method=plot, max_points=plot_points, seed=cfg.train.seed)
    return out
