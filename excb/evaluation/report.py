"""PNG plots of a run directory's per-epoch metrics: loss, kNN top-1, cluster shares and health."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from excb.rundir.runfiles import read_metrics  # noqa: E402
from excb.storage import atomic_write_bytes, exists, join, read_text, resolve_fs  # noqa: E402


def save_figure(fig: Any, uri: str, integer_x: bool = True) -> str:
    """Write ``fig`` as PNG to ``uri`` (local or object storage) atomically and close it; ``integer_x``: epoch
    axes get integer ticks."""
    if integer_x:  # epochs
        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fs, path = resolve_fs(uri)
    atomic_write_bytes(fs, path, buf.getvalue())
    return uri


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in history if key in r]
    return [int(r["epoch"]) for r in rows], [float(r[key]) for r in rows]


def _summary(run_dir: str) -> dict[str, Any]:
    """RUN_DIR/summary.json, or {} before the run has one."""
    import json

    path = join(run_dir, "summary.json")
    return json.loads(read_text(path)) if exists(path) else {}


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Draw loss.png, knn.png and clusters.png from RUN_DIR/metrics.jsonl into RUN_DIR/plots (or out_dir); knn.png
    also marks the final kNN and the raw-pixel and untrained-network references of summary.json when present."""
    history = read_metrics(run_dir)
    if not history:
        raise FileNotFoundError(f"no metrics in {run_dir} (expected {join(run_dir, 'metrics.jsonl')})")
    out = out_dir or join(run_dir, "plots")
    written = []

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*_series(history, "loss"), marker="o")
    ax.set(xlabel="epoch", ylabel="loss", title="ExCB loss")
    ax.grid(alpha=0.3)
    written.append(save_figure(fig, join(out, "loss.png")))

    epochs, knn = _series(history, "subset_knn_top1")
    if knn:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(epochs, knn, marker="o", color="tab:green", label="model (per-epoch subset)")
        summary = _summary(run_dir)
        if "knn_top1" in summary:
            ax.scatter([epochs[-1]], [summary["knn_top1"]], marker="*", s=120, color="tab:green", zorder=3,
                       label="model (final, all images)")
        for key, label, colour in (("raw_pixels_knn_top1", "raw pixels (all images)", "tab:grey"),
                                   ("random_init_knn_top1", "untrained network (all images)", "tab:red")):
            if key in summary:
                ax.axhline(summary[key], color=colour, ls="--", lw=1, label=label)
        ax.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN top-1")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, join(out, "knn.png")))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, label in (("estimate_max_cluster_share_x_uniform", "max share × K (estimate)"),
                       ("estimate_min_cluster_share_x_uniform", "min share × K (estimate)"),
                       ("subset_max_cluster_share_x_uniform", "max share × K (assignments)")):
        e, v = _series(history, key)
        if v:
            a1.plot(e, v, marker="o", label=label)
    a1.axhline(1.0, color="grey", lw=0.8, ls="--")
    a1.set(xlabel="epoch", ylabel="share × K (1 = uniform)", title="cluster shares")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    for key, label in (("estimate_normalized_entropy", "entropy of estimate"),
                       ("subset_prototypes_used", "prototypes used (assignments)"),
                       ("estimate_prototypes_used", "prototypes used (estimate)"),
                       ("teacher_confidence", "teacher confidence")):
        e, v = _series(history, key)
        if v:
            a2.plot(e, v, marker="o", label=label)
    a2.set(xlabel="epoch", ylim=(0, 1.05), title="cluster health")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    written.append(save_figure(fig, join(out, "clusters.png")))
    return written



def _read_trials(sweep_dir: str) -> list[dict[str, str]]:
    import csv

    return list(csv.DictReader(io.StringIO(read_text(join(sweep_dir, "trials.csv")))))


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def plot_sweep(sweep_dir: str, out_dir: str | None = None) -> list[str]:
    """From SWEEP_DIR/trials.csv and each trial's runs/<id>/metrics.jsonl draw, into SWEEP_DIR/plots:
    ``metric_vs_<key>.png`` (best metric of every trial against each swept key; errored trials marked) and
    ``learning_curves.png`` (the metric per epoch of all trials)."""
    import json

    summary = json.loads(read_text(join(sweep_dir, "sweep.json")))
    metric, space = summary["metric"], summary["space"]
    trials = _read_trials(sweep_dir)
    out = out_dir or join(sweep_dir, "plots")
    written = []
    best_col = f"best_{metric}"
    for key, dom in space.items():
        kind = next(iter(dom))
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ok = [(t[key], _number(t[best_col])) for t in trials if _number(t[best_col]) is not None]
        numeric = all(_number(v) is not None for v, _ in ok)
        xs = [_number(v) if numeric else str(v) for v, _ in ok]
        ax.scatter(xs, [m for _, m in ok], color="tab:blue", label="trials")
        bad = [t[key] for t in trials if t["status"] == "ERROR"]
        if bad and numeric and all(_number(v) is not None for v in bad):
            lo = min((m for _, m in ok), default=0.0)
            ax.scatter([_number(v) for v in bad], [lo] * len(bad), marker="x", color="tab:red", label="failed")
        if kind == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=f"best {metric}", title=f"{metric} vs {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, join(out, f"metric_vs_{key}.png"), integer_x=False))
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in trials:
        run = join(sweep_dir, "runs", t["trial_id"])
        if not exists(join(run, "metrics.jsonl")):
            continue
        e, v = _series(read_metrics(run), metric)
        if v:
            label = ", ".join(f"{k.split('.')[-1]}={t[k]}" for k in space)
            ax.plot(e, v, marker=".", label=label[:60])
    ax.set(xlabel="epoch", ylabel=metric, title="learning curves of all trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    written.append(save_figure(fig, join(out, "learning_curves.png")))
    return written

