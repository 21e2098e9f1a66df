"""Weighted kNN (DINO's protocol) over train features that arrive in blocks: a running top-k per test sample, so
memory is set by the block sizes, not by the number of train features.

With test features q_j and train features x_i (both L2-normalised), the score of class c for q_j is

    score_j(c) = Σ_{i ∈ N_k(j), y_i = c} exp(⟨q_j, x_i⟩ / T),

N_k(j) the k train features most similar to q_j; the prediction is argmax_c score_j(c). N_k over the union of
blocks is the top-k of the concatenation of each block's top-k with the running top-k (:func:`merge_topk`), so
visiting the train features block by block gives the same neighbours as one pass over all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Neighbours:
    """The running top-k of every test sample: similarities ``sims`` [N, k'] (descending) and the neighbours'
    train labels ``labels`` [N, k'], k' ≤ k while fewer than k train features have been seen."""

    sims: Tensor
    labels: Tensor


def merge_topk(a: Neighbours, b: Neighbours, k: int) -> Neighbours:
    """The top-k of the union of two neighbour sets of the same test samples: topk over [a | b] per row."""
    sims = torch.cat([a.sims, b.sims], dim=1)
    labels = torch.cat([a.labels, b.labels], dim=1)
    top, idx = sims.topk(min(k, sims.shape[1]), dim=1)
    return Neighbours(top, labels.gather(1, idx))


@torch.no_grad()
def blockwise_neighbours(test_feats: Tensor, train_blocks: Iterable[tuple[Tensor, Tensor]], k: int,
                         test_chunk: int = 4096) -> Neighbours:
    """The k nearest train features (cosine) of every test feature, visiting ``train_blocks`` — (features [M, D],
    labels [M]) — one at a time; the test features are taken ``test_chunk`` rows at a time within a block, so
    the largest similarity matrix is test_chunk × M."""
    test = F.normalize(test_feats.float(), dim=1)
    n = test.shape[0]
    best = Neighbours(torch.empty(n, 0), torch.empty(n, 0, dtype=torch.long))
    for feats, labels in train_blocks:
        train = F.normalize(feats.float(), dim=1)
        labels = torch.as_tensor(labels).long()
        kb = min(k, train.shape[0])
        if kb == 0:
            continue
        sims, idx = [], []
        for i in range(0, n, test_chunk):
            s, j = (test[i:i + test_chunk] @ train.T).topk(kb, dim=1)
            sims.append(s)
            idx.append(j)
        block = Neighbours(torch.cat(sims), labels[torch.cat(idx)])
        best = merge_topk(best, block, k)
    return best


def knn_votes(neighbours: Neighbours, num_classes: int, temperature: float) -> Tensor:
    """score(c) = Σ over the neighbours with label c of exp(sim / T), per test sample: [N, num_classes]."""
    weights = (neighbours.sims / temperature).exp()
    votes = torch.zeros(weights.shape[0], num_classes, dtype=weights.dtype)
    return votes.scatter_add_(1, neighbours.labels, weights)


def knn_top1_blockwise(train_blocks: Iterable[tuple[Tensor, Tensor]], test_feats: Tensor, test_labels: Tensor,
                       num_classes: int, k: int = 20, temperature: float = 0.07, test_chunk: int = 4096) -> float:
    """Weighted kNN top-1 (percent) of ``test_feats`` against train features given in blocks."""
    neighbours = blockwise_neighbours(test_feats, train_blocks, k, test_chunk)
    predicted = knn_votes(neighbours, num_classes, temperature).argmax(dim=1)
    return 100.0 * (predicted == torch.as_tensor(test_labels).long()).float().mean().item()
