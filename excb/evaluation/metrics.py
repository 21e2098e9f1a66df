"""Evaluation metrics on features and cluster assignments: weighted kNN, linear probe, cluster health, NMI,
ARI and cluster accuracy (Hungarian and majority-label)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from excb.evaluation.knn import knn_top1_blockwise


def knn_top1(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024, train_block: int = 16384) -> float:
    """Weighted kNN top-1 (percent) with cosine similarity: each test sample's score for class c is

        Σ_{i ∈ top-k neighbours, y_i = c} exp(sim_i / T),

    the prediction is the arg-max class (DINO's kNN protocol). Computed block-wise
    (:func:`excb.evaluation.knn.knn_top1_blockwise`): ``train_block`` train rows × ``chunk`` test rows of
    similarities at a time."""
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    blocks = ((train_feats[i:i + train_block], train_labels[i:i + train_block])
              for i in range(0, train_feats.shape[0], train_block))
    return knn_top1_blockwise(blocks, test_feats, test_labels, num_classes, k, temperature, test_chunk=chunk)


def share_stats(shares: np.ndarray | Tensor) -> dict[str, float]:
    """Cluster health of relative sizes s (sums to 1): prototypes used (s_k > 0, as a fraction of K),
    max and min share × K (1 = uniform), and normalised entropy H(s)/log K."""
    s = torch.as_tensor(shares, dtype=torch.float64)
    s = s / s.sum().clamp_min(1e-12)
    k = s.numel()
    nz = s[s > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(k)) + 0.0 if k > 1 else 1.0  # + 0.0: no -0.0
    return {
        "prototypes_used": float((s > 0).double().mean()),
        "max_cluster_share_x_uniform": float(s.max() * k),
        "min_cluster_share_x_uniform": float(s.min() * k),
        "normalized_entropy": entropy,
    }


def assignment_shares(assignments: Tensor, k: int) -> Tensor:
    """Fraction of samples assigned to each of ``k`` clusters."""
    counts = torch.bincount(assignments.long().flatten(), minlength=k).double()
    return counts / counts.sum().clamp_min(1)


def estimate_stats(sizes: Tensor, used_threshold: float = 0.1) -> dict[str, float]:
    """Health of the running size estimate s: a prototype counts as used when s_k ≥ threshold/K (the estimate
    never reaches exactly zero); max/min share × K; normalised entropy."""
    s = sizes.double() / sizes.double().sum()
    k = s.numel()
    stats = share_stats(s)
    stats["prototypes_used"] = float((s * k >= used_threshold).double().mean())
    return {f"estimate_{key}": v for key, v in stats.items()}


def nmi(assignments: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information between cluster assignments and labels (arithmetic normalisation)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(labels, assignments))


def ari(assignments: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted Rand index between cluster assignments and labels (1 = identical partitions up to renaming,
    ≈ 0 for independent ones)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(labels), np.asarray(assignments)))


def contingency(assignments: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Contingency table C [clusters × classes]: C[k, c] = #{i : a_i = k, y_i = c}, over the clusters and
    classes that occur (rows and columns in sorted order of the values present)."""
    a = np.asarray(assignments).ravel()
    y = np.asarray(labels).ravel()
    if a.shape != y.shape:
        raise ValueError(f"assignments and labels differ in length: {a.shape[0]} vs {y.shape[0]}")
    _, ai = np.unique(a, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    table = np.zeros((int(ai.max(initial=-1)) + 1, int(yi.max(initial=-1)) + 1), dtype=np.int64)
    np.add.at(table, (ai, yi), 1)
    return table


def cluster_acc_hungarian(assignments: np.ndarray, labels: np.ndarray) -> float:
    """One-to-one (Hungarian) cluster accuracy, percent:

        ACC = 100 · max_{m injective} Σ_k C[k, m(k)] / N,

    the best one-to-one matching between clusters and classes on the contingency table C (scipy's
    ``linear_sum_assignment``). With more clusters than classes only ``#classes`` clusters get a class and the
    samples of every other cluster count as wrong, so K ≫ #classes is penalised (see
    :func:`cluster_acc_majority` for the many-to-one variant)."""
    from scipy.optimize import linear_sum_assignment

    table = contingency(assignments, labels)
    if table.size == 0:
        return 0.0
    rows, cols = linear_sum_assignment(table, maximize=True)
    return 100.0 * float(table[rows, cols].sum()) / float(table.sum())


def cluster_acc_majority(assignments: np.ndarray, labels: np.ndarray) -> float:
    """Many-to-one (majority-label) cluster accuracy, percent: every cluster predicts its most frequent label,

        ACC_maj = 100 · Σ_k max_c C[k, c] / N

    (cluster purity). It never decreases as clusters are split, so it is only comparable at equal K."""
    table = contingency(assignments, labels)
    if table.size == 0:
        return 0.0
    return 100.0 * float(table.max(axis=1).sum()) / float(table.sum())


def linear_probe_top1(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *,
                      weight_decay: float = 1e-4, max_iter: int = 100) -> float:
    """Linear probe top-1 (percent) on frozen features.

    Recipe: standardise every feature dimension with the training split's mean and standard deviation
    (x ← (x − μ)/max(σ, 1e-6), applied to both splits); fit a multinomial logistic regression (W, b) on all
    training rows by full-batch L-BFGS (strong-Wolfe line search, history 20, at most ``max_iter`` iterations,
    from W = 0, b = 0) minimising

        (1/N) Σ_i CE(W x_i + b, y_i) + (λ/2) ‖W‖²,   λ = ``weight_decay`` (bias not decayed);

    report the arg-max accuracy on the test split. The problem is convex and starts from zero, so the result is
    deterministic (no random draws). About 1–3 s for 60k × 256 features on one CPU thread."""
    xtr = train_feats.detach().float().cpu()
    xte = test_feats.detach().float().cpu()
    ytr = train_labels.detach().long().cpu()
    yte = test_labels.detach().long().cpu()
    mu = xtr.mean(dim=0)
    sd = xtr.std(dim=0, unbiased=False).clamp_min(1e-6)
    xtr = (xtr - mu) / sd
    xte = (xte - mu) / sd
    num_classes = int(max(ytr.max().item(), yte.max().item())) + 1
    weight = torch.zeros(num_classes, xtr.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(xtr, weight, bias), ytr) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = F.linear(xte, weight, bias).argmax(dim=1)
    return 100.0 * float((pred == yte).double().mean())
