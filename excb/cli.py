"""``excb prepare | pretrain | sweep | evaluate | export | report | bench`` — the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from excb import console

DEFAULT_CONFIG = "experiments/fashion_mnist.yaml"
VERBOSE_HELP = ("also show what Ray and the libraries print for themselves: Ray Train's per-report lines, Ray "
                "Data's execution and progress output, Ray's start-up notices, deprecation/future warnings "
                "(also: EXCB_VERBOSE=1)")


def _default_config() -> str | None:
    """experiments/fashion_mnist.yaml next to the working directory or the installed package's repository."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / DEFAULT_CONFIG).exists():
            return str(base / DEFAULT_CONFIG)
    return None


def cmd_prepare(args: argparse.Namespace) -> int:
    from excb.data.prepare import prepare_fashion_mnist, prepare_image_folder

    if args.source == "fashion-mnist":
        meta = prepare_fashion_mnist(args.dest, limit=args.limit, rows_per_shard=args.rows_per_shard)
    else:
        if not args.src:
            print("excb prepare folder needs SRC: the image folder tree to convert", file=sys.stderr)
            return 2
        meta = prepare_image_folder(args.src, args.dest, rows_per_shard=args.rows_per_shard, limit=args.limit)
    print(json.dumps(meta, indent=2))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from excb.config import load_config
    from excb.run.pretrain import run_pretraining

    config = args.config or _default_config()
    cfg = load_config(config, args.overrides)  # validates before anything starts
    name = args.name or (Path(config).stem if config else "excb")
    summary = run_pretraining(cfg, storage_path=args.storage_path, name=name, num_cpus=args.num_cpus)
    run_dir = summary["run_dir"]
    plots = []
    try:
        from excb.evaluation.report import plot_run

        plots = plot_run(run_dir)
    except Exception as e:  # noqa: BLE001 - plots are a convenience; never lose a finished run over them
        console.error(f"plotting failed: {e}")
    if "knn_top1" in summary:
        print(f"kNN top-1: {summary['knn_top1']:.2f}%  (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}, "
              f"{summary['eval_train_rows']} train → {summary['eval_test_rows']} test images)")
    if "linear_top1" in summary:
        print(f"linear probe top-1: {summary['linear_top1']:.2f}%  ARI: {summary['ari']:.3f}  cluster accuracy: "
              f"{summary['cluster_acc_hungarian']:.1f}% (Hungarian), {summary['cluster_acc_majority']:.1f}% (majority)")
    from excb.evaluation.reference import reference_lines

    for line in reference_lines(summary):
        print(line)
    if "prototypes_used" in summary:
        print(f"prototypes used: {100 * summary['prototypes_used']:.1f}%  max cluster share: "
              f"{summary['max_cluster_share_x_uniform']:.2f}× uniform  NMI: {summary.get('nmi', float('nan')):.3f}")
    print(f"throughput: {summary['images_per_second']:.0f} images/s  wall time: {summary['wall_seconds'] / 60:.1f} min")
    print(f"checkpoint: {summary.get('checkpoint', run_dir)}")
    print(f"metrics:    {run_dir}/metrics.jsonl, {run_dir}/summary.json")
    if plots:
        print(f"plots:      {', '.join(plots)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from excb.evaluation.evaluate import evaluate_run
    from excb.evaluation.features import BackboneMismatchError
    from excb.rundir.checkpoint import CheckpointError
    from excb.rundir.runfiles import read_summary, write_summary
    from excb.storage import exists, join

    if args.limit < 0:
        print("excb evaluate needs --limit >= 0", file=sys.stderr)
        return 2
    try:
        result = evaluate_run(args.run_dir, data_path=args.data, plot=args.plot, plot_points=args.plot_points,
                              linear_probe=False if args.no_linear_probe else None, limit=args.limit or None,
                              engine=args.engine, knn_only=args.knn_only)
    except (BackboneMismatchError, CheckpointError) as e:
        print(f"excb: error: {e}", file=sys.stderr)
        return 2
    if args.write and not args.limit and not args.knn_only:  # a quick look never replaces the full numbers
        summary = read_summary(args.run_dir) if exists(join(args.run_dir, "summary.json")) else {}
        summary.update(result)
        write_summary(args.run_dir, summary)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_linear(args: argparse.Namespace) -> int:
    from excb.config import ConfigError
    from excb.evaluation.features import BackboneMismatchError
    from excb.linear.config import load_linear_config
    from excb.linear.job import run_linear
    from excb.rundir.checkpoint import CheckpointError

    try:
        lc = load_linear_config(args.config, args.overrides)
        summary = run_linear(args.run_dir, lc, num_cpus=args.num_cpus)
    except (ConfigError, BackboneMismatchError, CheckpointError, ValueError) as e:
        print(f"excb: error: {e}", file=sys.stderr)
        return 2
    print(f"linear evaluation top-1: {summary['top1']:.2f}%  top-5: {summary['top5']:.2f}%  (head at lr "
          f"{summary['lr']:g}; best of {summary['heads']} head(s): {summary['best_top1']:.2f}% at lr "
          f"{summary['best_lr']:g}; {summary['val_rows']} validation images)")
    print(f"summary:    {summary['run_dir']}/{lc.name}/summary.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from excb.evaluation.export import ExportError, export_run
    from excb.rundir.checkpoint import CheckpointError

    try:
        meta = export_run(args.run_dir, args.out)
    except (CheckpointError, ExportError) as e:
        print(f"excb: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from excb.evaluation.report import plot_run, plot_sweep
    from excb.storage import exists, join

    is_sweep = exists(join(args.run_dir, "trials.csv"))
    for path in (plot_sweep if is_sweep else plot_run)(args.run_dir, args.out):
        print(path)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from excb.evaluation.report import plot_sweep
    from excb.run.sweep import load_sweep, run_sweep

    spec = load_sweep(args.config, args.overrides)  # validates before Ray starts
    name = args.name or Path(args.config).stem
    summary = run_sweep(spec, storage_path=args.storage_path, name=name, num_cpus=args.num_cpus)
    print(json.dumps(summary, indent=2, default=str))
    try:
        for path in plot_sweep(summary["experiment"]):
            print(path)
    except Exception as e:  # noqa: BLE001 - plots are a convenience; the table and best config are written
        console.error(f"plotting failed: {e}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from excb.config import load_config
    from excb.run.bench import format_table, run_bench

    if args.steps < 1 or args.warmup < 0:
        print("excb bench needs --steps >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    config = args.config or _default_config()
    cfg = load_config(config, args.overrides)  # validates before anything starts
    argv = ["excb", "bench", *(["--config", config] if config else []), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--out", args.out,
            *(["--storage-path", args.storage_path] if args.storage_path else []),
            *(["--num-cpus", str(args.num_cpus)] if args.num_cpus else []), *args.overrides]
    result = run_bench(cfg, steps=args.steps, warmup=args.warmup, out=args.out, command=shlex.join(argv),
                       storage_path=args.storage_path, num_cpus=args.num_cpus)
    print(format_table(result))
    print(f"written: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="excb", description="ExCB self-supervised pretraining on Ray")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="write Parquet image shards from Fashion-MNIST or an image folder tree")
    p.add_argument("source", choices=["fashion-mnist", "folder"])
    p.add_argument("dest", help="output shard root (local path or s3:// / gs:// URI)")
    p.add_argument("src", nargs="?", help="image folder tree (for `folder`)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per split")
    p.add_argument("--rows-per-shard", type=int, default=10000)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="ExCB pretraining through Ray Train (resumes a run of the same name)")
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    p.add_argument("--storage-path", default="runs", help="where runs live (local path or s3:// URI)")
    p.add_argument("--name", default=None, help="run name (default: the config file's stem)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for a local Ray instance")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=5")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="kNN, linear probe, NMI/ARI/cluster accuracy and cluster health of a "
                                        "run's newest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="shard root to evaluate on (default: the run's)")
    p.add_argument("--no-write", dest="write", action="store_false", help="do not update summary.json")
    p.add_argument("--plot", nargs="?", const="pca", default=None, choices=["pca", "tsne"],
                   help="also draw the test features in 2-D (PCA, or t-SNE) into RUN_DIR/plots/embedding_*.png")
    p.add_argument("--plot-points", type=int, default=5000, help="at most this many test points in the plot")
    p.add_argument("--no-linear-probe", action="store_true", help="skip the linear probe (kNN and clustering only)")
    p.add_argument("--limit", type=int, default=0,
                   help="quick look: only the first N images of each split (summary.json is then left as it is)")
    p.add_argument("--knn-only", action="store_true", help="quick look: kNN and cluster metrics, no linear probe")
    p.add_argument("--engine", choices=["auto", "memory", "ray"], default=None,
                   help="memory: decode both splits into this process; ray: extract features with Ray Data into "
                        "RUN_DIR/features/ (reused by later evaluations of the same checkpoint) and run a "
                        "block-wise kNN over Ray tasks, for any dataset size (default: eval.engine, auto)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("linear", help="the paper's linear evaluation: a linear head trained on the frozen teacher "
                                      "backbone through Ray Train (resumes when run again)")
    p.add_argument("run_dir")
    p.add_argument("--config", default=None,
                   help="linear-evaluation YAML (experiments/linear/*.yaml; default: the released ResNet protocol)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for a local Ray instance")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=10 num_workers=2")
    p.set_defaults(func=cmd_linear)

    p = sub.add_parser("export", help="write the teacher backbone of a run's newest checkpoint as a plain state "
                                      "dict, with export.json and a standalone features.py")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="Ray Tune sweep over config keys (resumes a sweep of the same name)")
    p.add_argument("--config", required=True, help="sweep YAML (see excb/run/sweep.py)")
    p.add_argument("--storage-path", default="runs")
    p.add_argument("--name", default=None, help="sweep name (default: the sweep file's stem)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every trial")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="draw a run's (or a sweep's) metrics as PNG plots")
    p.add_argument("run_dir", help="a run directory, or a sweep directory (with trials.csv)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="images/s of the data pipeline, the training step (synthetic data, phase "
                                     "breakdown), Ray Train with 1 worker and a plain PyTorch loop")
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    p.add_argument("--steps", type=int, default=30, help="timed steps (batches) per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each in-process measurement")
    p.add_argument("--out", default="bench.json", help="JSON result file (written atomically)")
    p.add_argument("--storage-path", default=None,
                   help="keep the Ray Train run here (default: a temporary folder, deleted afterwards)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for a local Ray instance")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.backbone=resnet18_small")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # pretrain, sweep, bench: --verbose, or else EXCB_VERBOSE; the other commands print nothing of Ray's
    previous = console.set_verbose(True if getattr(args, "verbose", False) else None)
    try:
        if hasattr(args, "verbose") and not console.is_verbose():
            console.hide_library_warnings()  # import-time warnings of torch & co.; again once Ray is imported
        return _run(args)
    finally:
        console.set_verbose(previous)


def _run(args: argparse.Namespace) -> int:
    from excb.config import ConfigError
    from excb.data.errors import CorruptImageError, DatasetNotFoundError, ShardReadError
    from excb.run.pretrain import TrainingError
    from excb.storage import StorageError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetNotFoundError, CorruptImageError, ShardReadError, StorageError, TrainingError) as e:
        print(f"excb: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
