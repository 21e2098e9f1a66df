"""Evaluation of a teacher network: weighted kNN on backbone features, cluster health and NMI of its
prototype assignments."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from excb.augment import MultiCropAugment
from excb.metrics import assignment_shares, knn_top1, nmi, share_stats
from excb.model import ExcbNetwork


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
            x = augment.plain(images[i:i + batch_size].to(device))
            if net.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            f = net.backbone(x)
            z = net.prototypes(net.projector(f))
            feats.append(f.float().cpu())
            assign.append(z.argmax(dim=1).cpu())
    finally:
        net.train(was_training)
    return torch.cat(feats), torch.cat(assign)


def evaluate_teacher(net: ExcbNetwork, augment: MultiCropAugment, train_x: Tensor, train_y: np.ndarray,
                     test_x: Tensor, test_y: np.ndarray, *, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """kNN top-1 (train → test), NMI of test assignments vs labels, and the health of the train split's
    prototype assignments (prototypes used, max/min share × K, normalised entropy)."""
    ftr, atr = extract_features(net, augment, train_x)
    fte, ate = extract_features(net, augment, test_x)
    num_k = net.prototypes.weight.shape[0]
    out: dict[str, float] = {}
    has_labels = train_y.size and test_y.size and train_y.min() >= 0 and test_y.min() >= 0
    if has_labels:
        out["knn_top1"] = knn_top1(ftr, torch.from_numpy(train_y), fte, torch.from_numpy(test_y), k, temperature)
        out["nmi"] = nmi(ate.numpy(), test_y)
    out.update(share_stats(assignment_shares(atr, num_k)))
    return out
