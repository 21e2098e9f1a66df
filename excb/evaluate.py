"""Evaluation of a teacher network: weighted kNN on backbone features, cluster health and NMI of its
prototype assignments."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from excb.augment import MultiCropAugment
from excb.config import ExcbConfig
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


def teacher_from_state(state: dict) -> tuple[ExcbNetwork, ExcbConfig]:
    """Rebuild the teacher network (and the run's config) from a training-state checkpoint."""
    from excb.config import from_dict
    from excb.model import build_student_teacher

    cfg = from_dict(state["config"])
    _, teacher = build_student_teacher(cfg)
    teacher.load_state_dict(state["teacher"])
    return teacher, cfg


def evaluate_run(run_dir: str, data_path: str | None = None) -> dict[str, float]:
    """Full evaluation of a run's newest good checkpoint: kNN (all train rows → all test rows), NMI, cluster
    health of the train split's assignments, and the size estimate's health."""
    from excb.checkpoint import list_checkpoints, load_latest
    from excb.data.pipeline import load_split_arrays
    from excb.metrics import estimate_stats

    state, where = load_latest(list_checkpoints(run_dir))
    teacher, cfg = teacher_from_state(state)
    path = data_path or cfg.data.path
    kw = dict(image_size=cfg.data.image_size, channels=cfg.data.channels)
    train_x, train_y = load_split_arrays(path, "train", **kw)
    test_x, test_y = load_split_arrays(path, "test", **kw)
    augment = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    torch.set_num_threads(cfg.train.torch_threads or torch.get_num_threads())
    out = evaluate_teacher(teacher, augment, torch.from_numpy(train_x), train_y, torch.from_numpy(test_x), test_y,
                           k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    out.update(estimate_stats(state["balancer"]["sizes"]))
    out.update(epochs=int(state["epoch"]), steps=int(state["step"]), checkpoint=where,
               eval_train_rows=int(len(train_x)), eval_test_rows=int(len(test_x)))
    return out
