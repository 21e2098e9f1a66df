"""The claims experiment at the full recipe length: ExCB against DINO centering, SwAV Sinkhorn and no balancing on
Fashion-MNIST, each cell the shipped recipe (experiments/fashion_mnist.yaml, with its lr rule, length and precision
pinned to what the grid measures: ``GRID_BASE_LR``, ``GRID_BASE_BATCH``, ``GRID_RECIPE_PINS``) for all its epochs over
the whole 60k training split, at global batch 16 and 256.

    .venv/bin/python experiments/claims_full_length.py                # every missing cell (resumable), then the report
    .venv/bin/python experiments/claims_full_length.py --report-only  # table + plots from the finished cells

The cells, in the order they run: seed 0 for every (method, batch), then seeds 1 and 2 at batch 16 (``--batches``,
``--seeds``, ``--extra-seeds`` and ``--extra-seeds-batch`` change that). Only ``method.balancer`` differs between
methods; the learning rate scales linearly with the batch, lr = 0.3 · B / 256 (the recipe's rule when the grid
began), the warm-up, EMA, crop and weight-decay schedules stay in epochs as the recipe gives them, so batch 16 runs 16×
the optimiser steps of batch 256 on the same images.

Every step is the project's own (``ExcbLearner.step`` → ``excb.method.step.train_step``) in a plain 1-thread loop per
cell, ``--jobs`` cells at a time (two 1-thread runs use 2 cores better than one 2-thread run at small batches).

Resumable at two levels: a cell with ``CELL/result.json`` is skipped; an unfinished cell saves its whole training state
(learner, view-generator and torch RNG states, per-epoch curve) to ``CELL/state.pt`` after every epoch and continues
from it, so a sitting that ends mid-cell loses at most one epoch. Files are written atomically (temp file + rename).

Per cell: after every epoch the kNN (k = 20) of the teacher on the recipe's per-epoch subset (``eval.epoch_knn_train``
train → ``eval.epoch_knn_test`` test images) with the loss, throughput and size-estimate statistics
(``CELL/curve.json``); at the end kNN and linear probe on all train → all test images, NMI/ARI of the test
assignments, prototypes used / entropy / largest share of the train assignments, and the size estimate's statistics
(``CELL/result.json``). The report: ``table.md`` / ``summary.json`` (mean ± std over seeds), ``paired.md`` /
``paired.json`` (ExCB minus each baseline, seed by seed, with a paired t test) and ``curves.png``.
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

from compare_balancers import LABELS, METHODS, load_rows, markdown_table, run_name, summarise

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "experiments" / "results" / "claims_full_length"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# The recipe as the grid measures it: the shipped Fashion-MNIST recipe of 2026-12-02, when the first cells ran (base
# batch 256 at lr 0.3, 15 epochs, fp32). Pinned so that a later change of the default recipe's schedule or precision
# (issue 16) does not make the remaining cells differ from the finished ones; every other key comes from --config.
GRID_BASE_BATCH, GRID_BASE_LR = 256, 0.3
GRID_RECIPE_PINS = ["train.epochs=15", "train.precision=fp32"]


def cell_overrides(method: str, batch: int, seed: int, epochs: int | None) -> list[str]:
    """The keys a cell sets on the recipe: the pinned length and precision, the balancer, the batch B, the seed and
    lr = 0.3 · B / 256 (the grid's base lr and batch)."""
    out = [*GRID_RECIPE_PINS, f"method.balancer={method}", f"train.batch_size={batch}", f"train.seed={seed}",
           f"optim.lr={GRID_BASE_LR * batch / GRID_BASE_BATCH}"]
    return out + ([f"train.epochs={epochs}"] if epochs else [])


def train_cell(out: Path, method: str, batch: int, seed: int, config: str, *, epochs: int | None = None,
               train_limit: int = 0, eval_train: int = 0, eval_test: int = 0,
               stop_after_epoch: int = 0, device: str = "cpu") -> dict[str, Any] | None:
    """Train one (method, batch, seed) cell to the end of the recipe, resuming from CELL/state.pt when present, then
    evaluate its teacher; writes CELL/curve.json every epoch and CELL/result.json at the end. ``stop_after_epoch``
    leaves after saving that epoch's state (an interrupted sitting, for tests) and returns None. ``device``: where
    the learner and the images live (``cuda`` on a GPU machine; the view and permutation generators stay on the CPU,
    so the same seed draws the same crops and batches on either; a state saved on one device resumes on the
    other)."""
    import numpy as np
    import torch

    from excb.config import load_config
    from excb.data.fashion_mnist import load_fashion_mnist
    from excb.evaluation.evaluate import evaluate_teacher, extract_features
    from excb.evaluation.metrics import estimate_stats, knn_top1
    from excb.method.learner import ExcbLearner
    from excb.method.schedules import steps_per_epoch

    torch.set_num_threads(1)
    dev = torch.device(device)
    cfg = load_config(config, cell_overrides(method, batch, seed, epochs))
    cell = out / run_name(method, batch, seed)
    cell.mkdir(parents=True, exist_ok=True)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    if train_limit:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    train_x = torch.from_numpy(train_x[:, None].copy()).to(dev)
    test_x = torch.from_numpy(test_x[:, None].copy()).to(dev)
    sub_tr, sub_te = min(cfg.eval.epoch_knn_train, len(train_x)), min(cfg.eval.epoch_knn_test, len(test_x))
    spe = steps_per_epoch(len(train_x), batch)
    learner = ExcbLearner(cfg, spe, device=dev)
    state_path = cell / "state.pt"
    curve: list[dict[str, Any]] = []
    train_seconds, start_epoch = 0.0, 0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        learner.load_state_dict(state["learner"])
        learner.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        curve, train_seconds, start_epoch = json.loads(state["curve"]), float(state["train_seconds"]), state["epoch"]
        print(f"[cell] {cell.name}: resuming after epoch {start_epoch}", flush=True)
    else:
        t0 = time.time()
        perm = torch.randperm(len(train_x), generator=learner.gen)
        learner.init_prototypes((train_x[perm[i:i + 256]] for i in range(0, len(perm), 256)),
                                cfg.method.kmeans_samples)
        train_seconds += time.time() - t0
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        perm = torch.randperm(len(train_x), generator=learner.gen)
        losses = [float(learner.step(train_x[perm[i * batch:(i + 1) * batch]], epoch=epoch).loss)
                  for i in range(spe)]
        dt = time.time() - t0
        train_seconds += dt
        ftr, _ = extract_features(learner.teacher, learner.augment, train_x[:sub_tr])
        fte, _ = extract_features(learner.teacher, learner.augment, test_x[:sub_te])
        knn = knn_top1(ftr, torch.from_numpy(train_y[:sub_tr]), fte, torch.from_numpy(test_y[:sub_te]),
                       k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
        curve.append({"epoch": epoch + 1, "subset_knn_top1": knn, "loss": float(np.mean(losses)),
                      "img_s": spe * batch / dt, "train_minutes": train_seconds / 60,
                      **estimate_stats(learner.balancer.sizes)})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in curve[-1].items()}), flush=True)
        _atomic_write(cell / "curve.json", json.dumps(curve, indent=1))
        _atomic_save({"learner": learner.state_dict(), "gen": learner.gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "curve": json.dumps(curve),
                      "train_seconds": train_seconds, "epoch": epoch + 1,
                      **({"cuda_rng": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {})}, state_path)
        if stop_after_epoch and epoch + 1 == stop_after_epoch:
            return None
    t0 = time.time()
    n_tr, n_te = eval_train or len(train_x), eval_test or len(test_x)
    ev = evaluate_teacher(learner.teacher, learner.augment, train_x[:n_tr], train_y[:n_tr], test_x[:n_te],
                          test_y[:n_te], k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                          linear_weight_decay=cfg.eval.linear_weight_decay, linear_max_iter=cfg.eval.linear_max_iter)
    row: dict[str, Any] = {
        "method": method, "batch": batch, "seed": seed, "epochs": cfg.train.epochs, "steps": learner.global_step,
        "images_seen": learner.global_step * batch, "lr": cfg.optim.lr, "train_seconds": train_seconds,
        "eval_seconds": time.time() - t0, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "eval_train": n_tr, "eval_test": n_te, "final_loss": curve[-1]["loss"],
        **ev, **estimate_stats(learner.balancer.sizes),
    }
    _atomic_save(learner.teacher.state_dict(), cell / "teacher.pt")
    _atomic_write(cell / "result.json", json.dumps(row, indent=1, default=float))
    state_path.unlink(missing_ok=True)
    return row


def planned_cells(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """Seed-0-style cells first (every method × batch × --seeds), then --extra-seeds at --extra-seeds-batch; small
    batches (the slowest) first within each group."""
    cells = [(m, b, s) for s in args.seeds for b in sorted(args.batches) for m in args.methods]
    cells += [(m, args.extra_seeds_batch, s) for s in args.extra_seeds for m in args.methods]
    return list(dict.fromkeys(cells))


def launch_all(args: argparse.Namespace) -> None:
    """Run every cell without a result.json, ``--jobs`` subprocesses at a time (one thread each)."""
    cells = [c for c in planned_cells(args) if not (args.out / run_name(*c) / "result.json").exists()]
    print(f"[claims] {len(cells)} cells to do in {args.out}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, str, float]] = []
    failed = []
    while cells or running:
        while cells and len(running) < args.jobs:
            m, b, s = cells.pop(0)
            cmd = [sys.executable, __file__, "--one", m, str(b), str(s), "--out", str(args.out), "--config",
                   args.config, "--train-limit", str(args.train_limit), "--eval-train", str(args.eval_train),
                   "--eval-test", str(args.eval_test), "--device", args.device]
            cmd += ["--epochs", str(args.epochs)] if args.epochs else []
            log = open(args.out / f"{run_name(m, b, s)}.log", "a")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            run_name(m, b, s), time.time()))
            log.close()
        time.sleep(2)
        for proc, name, t0 in list(running):
            if proc.poll() is not None:
                running.remove((proc, name, t0))
                if proc.returncode != 0:
                    failed.append(name)
                status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}, see {name}.log)"
                print(f"[claims] {name}: {status} in {(time.time() - t0) / 60:.1f} min; {len(cells)} queued",
                      flush=True)
    if failed:
        raise SystemExit(f"[claims] failed cells: {', '.join(failed)}")


def plot_curves(out: Path) -> Path:
    """curves.png: per-epoch subset kNN of every cell, one panel per batch size (seeds as thin lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(json.loads((p.parent / "result.json").read_text()) if (p.parent / "result.json").exists() else None,
             p.parent.name, json.loads(p.read_text())) for p in sorted(out.glob("*/curve.json"))]
    batches = sorted({int(name.split("-b")[1].split("-")[0]) for _, name, _ in runs})
    fig, axes = plt.subplots(1, max(len(batches), 1), figsize=(5 * max(len(batches), 1), 4), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for ax, b in zip(axes[0], batches):
        for _, name, curve in runs:
            m, rb, s = name.split("-")
            if int(rb[1:]) != b:
                continue
            ax.plot([c["epoch"] for c in curve], [c["subset_knn_top1"] for c in curve], color=colours[m],
                    lw=1.6 if s == "s0" else 0.8, label=LABELS[m] if s == "s0" else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("subset kNN top-1 (%)")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PAIRED_KEYS = ("knn_top1", "linear_top1")


def paired_differences(rows: list[dict[str, Any]], reference: str = "excb") -> list[dict[str, Any]]:
    """For every other method and batch, the reference minus that method on each seed both finished:
    d_s = x_ref,s − x_method,s; their mean d̄, sample std s_d and the paired t statistic t = d̄ / (s_d / √n) with its
    two-sided p = 2 · P(T_{n−1} > |t|) (Student's t, n − 1 degrees of freedom; t and p only where n ≥ 2 and s_d > 0),
    for each of ``PAIRED_KEYS``."""
    import numpy as np
    from scipy import stats

    by_cell = {(r["method"], int(r["batch"]), int(r["seed"])): r for r in rows}
    out: list[dict[str, Any]] = []
    for method in (m for m in METHODS if m != reference):
        for batch in sorted({b for m, b, _ in by_cell if m == method}):
            seeds = sorted(s for m, b, s in by_cell if m == method and b == batch and (reference, b, s) in by_cell)
            if not seeds:
                continue
            entry: dict[str, Any] = {"reference": reference, "method": method, "batch": batch, "seeds": seeds}
            for key in PAIRED_KEYS:
                d = np.array([by_cell[(reference, batch, s)][key] - by_cell[(method, batch, s)][key] for s in seeds])
                entry[key] = {"per_seed": [round(float(x), 4) for x in d], "mean": float(d.mean())}
                sd = float(d.std(ddof=1)) if len(d) >= 2 else 0.0
                if sd > 0:
                    t = float(d.mean() / (sd / np.sqrt(len(d))))
                    entry[key].update(t=t, p=float(2 * stats.t.sf(abs(t), df=len(d) - 1)))
            out.append(entry)
    return out


def paired_table(paired: list[dict[str, Any]]) -> str:
    """One row per (method, batch): the reference's per-seed differences, their mean and the paired test's p."""
    columns = " | ".join(f"{k}: per seed / mean / p" for k in PAIRED_KEYS)
    head = f"| reference − method | batch | seeds | {columns} |"
    lines = [head, "|---|---:|---:|" + "---|" * len(PAIRED_KEYS)]
    for e in paired:
        cells = []
        for k in PAIRED_KEYS:
            v = e[k]
            p = f"{v['p']:.2f}" if "p" in v else "–"
            cells.append(" ".join(f"{x:+.2f}" for x in v["per_seed"]) + f" / {v['mean']:+.2f} / {p}")
        lines.append(f"| {LABELS[e['reference']]} − {LABELS[e['method']]} | {e['batch']} | {len(e['seeds'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    rows = load_rows(args.out)
    if not rows:
        raise SystemExit(f"no finished cells in {args.out}")
    summary = summarise(rows)
    table = markdown_table(summary)
    paired = paired_differences(rows)
    paired_md = paired_table(paired)
    _atomic_write(args.out / "summary.json", json.dumps(summary, indent=1))
    _atomic_write(args.out / "table.md", table + "\n")
    _atomic_write(args.out / "paired.json", json.dumps(paired, indent=1))
    _atomic_write(args.out / "paired.md", paired_md + "\n")
    print(table)
    print(paired_md)
    print(plot_curves(args.out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--config", default=str(ROOT / "experiments" / "fashion_mnist.yaml"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 256])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--extra-seeds", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--extra-seeds-batch", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2, help="cells at a time (one thread each)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (--jobs cells share the GPU; at "
                    "batch 16 a cell is bound by kernel launches there, ~410 img/s on an H200: RESULTS.md)")
    ap.add_argument("--epochs", type=int, default=0, help="override the recipe's epochs (0: the recipe's; tests)")
    ap.add_argument("--train-limit", type=int, default=0, help="first N training images only (0: all; tests)")
    ap.add_argument("--eval-train", type=int, default=0, help="train images of the final kNN/probe (0: all)")
    ap.add_argument("--eval-test", type=int, default=0, help="test images of the final evaluation (0: all)")
    ap.add_argument("--stop-after-epoch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "BATCH", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        m, b, s = args.one
        row = train_cell(args.out, m, int(b), int(s), args.config, epochs=args.epochs or None,
                         train_limit=args.train_limit, eval_train=args.eval_train, eval_test=args.eval_test,
                         stop_after_epoch=args.stop_after_epoch, device=args.device)
        print(json.dumps(row, default=float) if row else f"[cell] stopped after epoch {args.stop_after_epoch}")
        return
    if not args.report_only:
        t0 = time.time()
        launch_all(args)
        print(f"[claims] cells finished in {(time.time() - t0) / 60:.1f} min", flush=True)
    report(args)


if __name__ == "__main__":
    main()
