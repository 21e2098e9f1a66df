"""Time one ExCB training step (views + teacher + student + optimiser + EMA + estimate) on synthetic uint8
images in a plain process, for a config plus overrides; prints images/s.

    .venv/bin/python experiments/step_timing.py [--config experiments/fashion_mnist.yaml] [overrides ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from excb.augment import MultiCropAugment
from excb.balancing import ClusterBalancer
from excb.config import load_config
from excb.engine import build_optimizer, train_step
from excb.model import build_student_teacher
from excb.schedules import build_schedules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="experiments/fashion_mnist.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    student, teacher = build_student_teacher(cfg)
    balancer = ClusterBalancer(cfg.model.num_prototypes, cfg.method.balance_momentum, cfg.method.argmax_boost)
    opt = build_optimizer(cfg, student)
    aug = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    sched = build_schedules(cfg, steps_per_epoch=args.steps + 3)
    gen = torch.Generator().manual_seed(0)
    b, c, s = cfg.train.batch_size, cfg.data.channels, cfg.data.image_size
    x = torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=gen)
    for i in range(3):  # warm-up
        train_step(cfg, student, teacher, balancer, opt, aug, sched, x, i, 0, gen)
    t0 = time.perf_counter()
    for i in range(args.steps):
        train_step(cfg, student, teacher, balancer, opt, aug, sched, x, 3 + i, 0, gen)
    dt = (time.perf_counter() - t0) / args.steps
    print(f"{dt * 1000:.0f} ms/step, {b / dt:.0f} images/s (batch {b}, {torch.get_num_threads()} threads, "
          f"{cfg.augment.num_local} local crops)")


if __name__ == "__main__":
    main()
