"""The claims experiment: ExCB against DINO centering, SwAV Sinkhorn and no balancing, on Fashion-MNIST, at
global batch sizes 16, 32, 64 and 256, with an equal number of images seen and several seeds per cell.

    .venv/bin/python experiments/compare_balancers.py                 # all runs (resumable), then the report
    .venv/bin/python experiments/compare_balancers.py --report-only   # table + plots from the finished runs

How it is scaled to fit a 2-core machine (48 runs in well under 3 hours):
- every run sees ``--images`` training images (default 24,000, 40 % of one pass over the 60k) in ``--epochs``
  pseudo-epochs of images/epochs images each; all schedules (lr warm-up and cosine, EMA, crop scale, weight
  decay) are compressed to that length, exactly as a full run's are to its length;
- the model is the shipped Fashion-MNIST recipe (experiments/fashion_mnist.yaml: ConvNet, K=256, 2+4 crops);
- the learning rate scales linearly with the batch, lr = recipe lr · B / recipe batch (0.3·B/256), with a
  warm-up of 0.3 pseudo-epochs (10 % of the run, as the recipe's 1 of 15 epochs is 7 %); k-means sees 8,192
  images (32 per prototype);
- runs use the project's own step (``excb.method.step.train_step``) in a plain single-process loop, ``--jobs`` at a
  time with one thread each, instead of one Ray Train job per run (Ray's start-up per run would add minutes
  and two 1-thread runs use the 2 cores better than one 2-thread run at small batches);
- evaluation on the teacher: weighted kNN (k=20) and a linear probe with the first ``--eval-train`` training
  images as the train set, on all 10k test images; NMI / ARI / cluster accuracy of the test assignments;
  prototypes used and normalised entropy of the train subset's assignments.

Every run writes RUN/result.json and RUN/teacher.pt atomically; finished runs are skipped on relaunch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

METHODS = ("excb", "centering", "sinkhorn", "none")
LABELS = {"excb": "ExCB", "centering": "DINO centering", "sinkhorn": "SwAV Sinkhorn", "none": "no balancing"}
TABLE_KEYS = ("knn_top1", "linear_top1", "nmi", "prototypes_used", "normalized_entropy",
              "max_cluster_share_x_uniform")


def run_name(method: str, batch: int, seed: int) -> str:
    return f"{method}-b{batch}-s{seed}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def train_one(out: Path, method: str, batch: int, seed: int, images: int, epochs: int, eval_train: int,
              config: str, eval_test: int = 10000) -> dict[str, Any]:
    """Train one (method, batch, seed) cell in this process and evaluate its teacher; returns the result row."""
    import numpy as np
    import torch

    from excb.config import load_config
    from excb.data.fashion_mnist import load_fashion_mnist
    from excb.evaluation.evaluate import evaluate_teacher
    from excb.evaluation.metrics import estimate_stats
    from excb.method.learner import ExcbLearner

    torch.set_num_threads(1)
    base = load_config(config)
    cfg = load_config(config, [f"method.balancer={method}", f"train.batch_size={batch}", f"train.seed={seed}",
                               f"train.epochs={epochs}", f"optim.lr={base.optim.lr * batch / base.train.batch_size}",
                               "optim.warmup_epochs=0.3", "method.kmeans_samples=8192",
                               "train.precision=fp32"])  # as measured (the recipe's precision is now auto)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x = torch.from_numpy(train_x[:, None].copy())
    test_x, test_y = torch.from_numpy(test_x[:eval_test, None].copy()), test_y[:eval_test]
    spe = images // (epochs * batch)
    learner = ExcbLearner(cfg, spe)  # torch and the view generator seeded with the run's seed
    teacher, augment, gen = learner.teacher, learner.augment, learner.gen
    t0 = time.time()
    order = torch.randperm(len(train_x), generator=gen)
    learner.init_prototypes((train_x[order[i:i + 256]] for i in range(0, len(order), 256)), cfg.method.kmeans_samples)
    stream = torch.cat([torch.randperm(len(train_x), generator=gen) for _ in range(-(-images // len(train_x)) + 1)])
    losses = []
    for epoch in range(epochs):
        for _ in range(spe):
            idx = stream[learner.global_step * batch:(learner.global_step + 1) * batch]
            losses.append(float(learner.step(train_x[idx], epoch=epoch).loss))
    train_seconds = time.time() - t0
    n = min(eval_train, len(train_x))
    ev = evaluate_teacher(teacher, augment, train_x[:n], train_y[:n], test_x, test_y,
                          k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    row: dict[str, Any] = {
        "method": method, "batch": batch, "seed": seed, "images_seen": learner.global_step * batch,
        "steps": learner.global_step,
        "lr": cfg.optim.lr, "train_seconds": train_seconds, "eval_seconds": time.time() - t0 - train_seconds,
        "final_loss": float(np.mean(losses[-max(1, spe // 4):])), **ev, **estimate_stats(learner.balancer.sizes),
    }
    run_dir = out / run_name(method, batch, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "teacher.pt.tmp"
    torch.save(teacher.state_dict(), tmp)
    tmp.replace(run_dir / "teacher.pt")
    _atomic_write(run_dir / "result.json", json.dumps(row, indent=1, default=float))
    return row


def launch_all(args: argparse.Namespace) -> None:
    """Run every missing cell, ``--jobs`` subprocesses at a time, small batches (the slowest) first."""
    cells = [(m, b, s) for b in args.batches for s in args.seeds for m in args.methods
             if not (args.out / run_name(m, b, s) / "result.json").exists()]
    print(f"[compare] {len(cells)} runs to do in {args.out}", flush=True)
    running: list[tuple[subprocess.Popen, str, float]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while cells or running:
        while cells and len(running) < args.jobs:
            m, b, s = cells.pop(0)
            cmd = [sys.executable, __file__, "--one", m, str(b), str(s), "--out", str(args.out),
                   "--images", str(args.images), "--epochs", str(args.epochs), "--eval-train", str(args.eval_train),
                   "--eval-test", str(args.eval_test), "--config", args.config]
            log = open(args.out / f"{run_name(m, b, s)}.log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            run_name(m, b, s), time.time()))
        time.sleep(2)
        for proc, name, t0 in list(running):
            if proc.poll() is not None:
                running.remove((proc, name, t0))
                status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}, see {name}.log)"
                print(f"[compare] {name}: {status} in {time.time() - t0:.0f}s; {len(cells)} queued", flush=True)


def load_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds for every (method, batch) cell."""
    import numpy as np

    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["method"], int(r["batch"])), []).append(r)
    out = []
    for (m, b), rs in sorted(cells.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        row: dict[str, Any] = {"method": m, "batch": b, "seeds": len(rs),
                               "minutes": float(np.mean([r["train_seconds"] for r in rs]) / 60)}
        for key in TABLE_KEYS:
            vals = np.array([r[key] for r in rs if key in r], dtype=float)
            if len(vals):
                row[key] = float(vals.mean())
                row[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """One row per (method, batch): mean ± sample std over its seeds, or the single value where there is one."""
    def cell(r: dict[str, Any], key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        if key not in r:
            return "–"
        if r["seeds"] == 1:
            return fmt.format(r[key] * scale)
        return f"{fmt.format(r[key] * scale)} ± {fmt.format(r[key + '_std'] * scale)}"

    lines = ["| method | batch | seeds | kNN top-1 % | linear top-1 % | NMI | prototypes used % | entropy | "
             "max share ×K |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {LABELS[r['method']]} | {r['batch']} | {r['seeds']} | {cell(r, 'knn_top1')} | "
                     f"{cell(r, 'linear_top1')} | "
                     f"{cell(r, 'nmi', fmt='{:.3f}')} | {cell(r, 'prototypes_used', 100, '{:.1f}')} | "
                     f"{cell(r, 'normalized_entropy', fmt='{:.3f}')} | "
                     f"{cell(r, 'max_cluster_share_x_uniform', fmt='{:.1f}')} |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], out: Path) -> list[Path]:
    """accuracy_vs_batch.png (kNN and linear, mean ± std per method) and cluster_shares.png (sorted shares of
    the train subset's assignments, seed 0, smallest and largest batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("knn_top1", "linear_top1"), ("kNN top-1 (%)", "linear top-1 (%)")):
        for m in METHODS:
            rs = [r for r in summary if r["method"] == m and key in r]
            if rs:
                ax.errorbar([r["batch"] for r in rs], [r[key] for r in rs], yerr=[r[key + "_std"] for r in rs],
                            marker="o", capsize=3, label=LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    paths.append(out / "accuracy_vs_batch.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    batches = sorted({r["batch"] for r in summary})
    shown = [batches[0], batches[-1]] if batches else []
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(10, 4), squeeze=False)
    for ax, b in zip(axes[0], shown):
        for m in METHODS:
            path = out / run_name(m, b, 0) / "shares.pt"
            if path.exists():
                s = torch.load(path, weights_only=True).double()
                ax.plot(range(1, len(s) + 1), (s.sort(descending=True).values * len(s)).clamp_min(1e-3),
                        label=LABELS[m])
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("prototype (sorted by share)")
        ax.set_ylabel("share × K (1 = uniform)")
        ax.set_title(f"cluster shares, batch {b}, seed 0")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    paths.append(out / "cluster_shares.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_shares(out: Path, config: str, eval_train: int) -> None:
    """Per-run assignment shares of the train subset (for the share plot), from the saved teachers."""
    import torch

    from excb.config import load_config
    from excb.data.fashion_mnist import load_fashion_mnist
    from excb.evaluation.evaluate import extract_features
    from excb.evaluation.metrics import assignment_shares
    from excb.method.augment import MultiCropAugment
    from excb.method.model import build_student_teacher

    x = None
    for teacher_path in sorted(out.glob("*-s0/teacher.pt")):
        dest = teacher_path.parent / "shares.pt"
        if dest.exists():
            continue
        if x is None:
            x = torch.from_numpy(load_fashion_mnist("train")[0][:eval_train, None].copy())
        cfg = load_config(config)
        _, teacher = build_student_teacher(cfg)
        teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
        _, assign = extract_features(teacher, MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std), x)
        tmp = dest.with_suffix(".pt.tmp")
        torch.save(assignment_shares(assign, cfg.model.num_prototypes).float(), tmp)
        tmp.replace(dest)


def report(args: argparse.Namespace) -> None:
    rows = load_rows(args.out)
    if not rows:
        raise SystemExit(f"no finished runs in {args.out}")
    summary = summarise(rows)
    write_shares(args.out, args.config, args.eval_train)
    table = markdown_table(summary)
    _atomic_write(args.out / "summary.json", json.dumps(summary, indent=1))
    _atomic_write(args.out / "table.md", table + "\n")
    print(table)
    for p in plot(summary, args.out):
        print(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "compare_fashion_mnist")
    ap.add_argument("--config", default=str(ROOT / "experiments" / "fashion_mnist.yaml"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 32, 64, 256])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=24000, help="training images seen per run")
    ap.add_argument("--epochs", type=int, default=3, help="pseudo-epochs the images are split into")
    ap.add_argument("--eval-train", type=int, default=20000, help="train images for kNN / linear probe")
    ap.add_argument("--eval-test", type=int, default=10000, help="test images for all evaluations")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "BATCH", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        m, b, s = args.one
        row = train_one(args.out, m, int(b), int(s), args.images, args.epochs, args.eval_train, args.config,
                        args.eval_test)
        print(json.dumps(row, default=float))
        return
    if not args.report_only:
        t0 = time.time()
        launch_all(args)
        print(f"[compare] all runs finished in {(time.time() - t0) / 60:.1f} min", flush=True)
    report(args)


if __name__ == "__main__":
    main()
