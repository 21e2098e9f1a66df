"""ExCB in a plain single-process PyTorch loop on in-memory Fashion-MNIST (no Ray).

Uses exactly the project's learner and training step (``excb.method.learner.ExcbLearner``). Two uses: quick
recipe exploration, and the reference a Ray Train run's throughput is compared with.

    .venv/bin/python experiments/plain_loop.py --config experiments/fashion_mnist.yaml train.epochs=2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from excb.config import load_config
from excb.data.fashion_mnist import load_fashion_mnist
from excb.evaluation.evaluate import extract_features
from excb.evaluation.metrics import estimate_stats, knn_top1
from excb.method.learner import ExcbLearner
from excb.method.schedules import steps_per_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="experiments/fashion_mnist.yaml")
    ap.add_argument("--knn-every", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop after this many minutes (0 = no limit)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x = torch.from_numpy(train_x[:, None].copy())
    test_x = torch.from_numpy(test_x[:, None].copy())
    if cfg.data.limit:
        train_x, train_y = train_x[: cfg.data.limit], train_y[: cfg.data.limit]
    bs = cfg.train.batch_size
    spe = steps_per_epoch(len(train_x), bs)
    learner = ExcbLearner(cfg, spe)
    teacher, balancer, augment, gen = learner.teacher, learner.balancer, learner.augment, learner.gen
    t0 = time.time()
    if cfg.method.kmeans_init:
        perm = torch.randperm(len(train_x), generator=gen)
        learner.init_prototypes((train_x[perm[i:i + bs]] for i in range(0, len(perm), bs)), cfg.method.kmeans_samples)
    print(f"kmeans {time.time() - t0:.1f}s", flush=True)
    for epoch in range(cfg.train.epochs):
        te = time.time()
        perm = torch.randperm(len(train_x), generator=gen)
        losses = []
        for i in range(spe):
            stats = learner.step(train_x[perm[i * bs:(i + 1) * bs]], epoch=epoch)
            losses.append(float(stats.loss))
        dt = time.time() - te
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "img_s": spe * bs / dt,
               "minutes": (time.time() - t0) / 60, "conf": float(stats.teacher_confidence),
               "uniq": float(stats.unique_targets), "changed": float(stats.changed_by_balancing),
               **estimate_stats(balancer.sizes)}
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == cfg.train.epochs):
            ftr, _ = extract_features(teacher, augment, train_x[:20000])
            fte, _ = extract_features(teacher, augment, test_x)
            row["knn20k"] = knn_top1(ftr, torch.from_numpy(train_y[:20000]), fte, torch.from_numpy(test_y))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if args.max_minutes and (time.time() - t0) / 60 > args.max_minutes:
            break
    ftr, atr = extract_features(teacher, augment, train_x)
    fte, _ = extract_features(teacher, augment, test_x)
    acc = knn_top1(ftr, torch.from_numpy(train_y[: len(ftr)]), fte, torch.from_numpy(test_y))
    from excb.evaluation.metrics import assignment_shares, share_stats
    print(json.dumps({"final_knn": acc, "minutes": (time.time() - t0) / 60,
                      **share_stats(assignment_shares(atr, cfg.model.num_prototypes))}), flush=True)


if __name__ == "__main__":
    main()
