"""View pairing and the cross-entropy between balanced teacher targets and student predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def view_pairs(num_global: int, num_crops: int, use_predictor: bool) -> list[tuple[int, str, int]]:
    """Pairs (teacher global view i, student output kind, student crop j) that enter the loss.

    With the predictor, for every teacher view i: the student's *direct* output of every other global view, and
    the student's *predictor* output of every crop (view i included) — 2 globals + 6 locals give 9 pairs per
    teacher view, 18 in all. Without the predictor: the *direct* outputs of every crop except view i itself
    (local crops still used).
    """
    pairs: list[tuple[int, str, int]] = []
    for i in range(num_global):
        for j in range(num_global):
            if j != i:
                pairs.append((i, "direct", j))
        if use_predictor:
            pairs.extend((i, "predicted", j) for j in range(num_crops))
        else:
            pairs.extend((i, "direct", j) for j in range(num_global, num_crops))
    return pairs


def excb_loss(teacher_probs: list[Tensor], student_direct: list[Tensor], student_predicted: list[Tensor] | None,
              student_temp: float) -> Tensor:
    """Mean over view pairs of the batch-mean cross-entropy

        L = mean_pairs mean_b [ −Σ_k p_i(k) · log_softmax(z_j / τ_s)(k) ]

    where p_i are the teacher's balanced targets for global view i and z_j the student's similarities.
    """
    num_global, num_crops = len(teacher_probs), len(student_direct)
    pairs = view_pairs(num_global, num_crops, student_predicted is not None)
    if not pairs:
        raise ValueError("no view pairs: need at least two crops")
    logp: dict[tuple[str, int], Tensor] = {}
    total = torch.zeros((), device=teacher_probs[0].device)
    for i, kind, j in pairs:
        key = (kind, j)
        if key not in logp:
            z = student_direct[j] if kind == "direct" else student_predicted[j]  # type: ignore[index]
            logp[key] = F.log_softmax(z.float() / student_temp, dim=-1)
        total = total + torch.sum(-teacher_probs[i] * logp[key], dim=-1).mean()
    return total / len(pairs)
