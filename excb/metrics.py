"""Evaluation metrics on features and cluster assignments: weighted kNN, cluster health, NMI."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_top1(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (percent) with cosine similarity: each test sample's score for class c is

        Σ_{i ∈ top-k neighbours, y_i = c} exp(sim_i / T),

    the prediction is the arg-max class (DINO's kNN protocol)."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    k = min(k, train.shape[0])
    correct = 0
    for i in range(0, test.shape[0], chunk):
        sims = test[i:i + chunk] @ train.T
        top_sim, top_idx = sims.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx].long(), weights)
        correct += (votes.argmax(dim=1) == test_labels[i:i + chunk]).sum().item()
    return 100.0 * correct / test.shape[0]


def share_stats(shares: np.ndarray | Tensor) -> dict[str, float]:
    """Cluster health of relative sizes s (sums to 1): prototypes used (s_k > 0, as a fraction of K),
    max and min share × K (1 = uniform), and normalised entropy H(s)/log K."""
    s = torch.as_tensor(shares, dtype=torch.float64)
    s = s / s.sum().clamp_min(1e-12)
    k = s.numel()
    nz = s[s > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(k)) if k > 1 else 1.0
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
