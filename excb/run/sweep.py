"""Hyperparameter sweeps with Ray Tune: a Tune function trainable per trial that builds and fits a ``TorchTrainer``.

A sweep file (YAML) names a base config, fixed overrides and a search space over any ``section.key``::

    base: experiments/fashion_mnist.yaml
    overrides: [train.epochs=4, data.limit=20000]
    space:
      model.num_prototypes: {grid: [128, 256, 512]}
      method.teacher_temp: {loguniform: [0.02, 0.08]}
      method.balance_momentum: {choice: [0.99, 0.999]}
    num_samples: 1            # repeats of the grid (each random key is drawn per sample)
    metric: subset_knn_top1   # reported every epoch by the workers (kNN on a held-out subset)
    mode: max
    asha: {grace_period: 1, reduction_factor: 2}   # or asha: null for no early stopping
    max_concurrent_trials: 1
    trial_resources: {CPU: 0.1}                    # the trial's driver; workers take train.* resources
    mlflow: null              # or {tracking_uri: file:///path, experiment: excb}
    seed: 0                   # random draws of the space

The experiment directory ``STORAGE/NAME`` holds Tune's trial folders (result.json, progress.csv, TensorBoard
events), ``runs/<trial_id>/`` (each trial's Ray Train run: checkpoints, metrics.jsonl), and at the end
``trials.csv`` (one row per trial), ``best_config.yaml`` and ``sweep.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from excb import console
from excb.config import ConfigError, ExcbConfig, dump_yaml, load_config
from excb.storage import join, write_json, write_text

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TRIALS_FILE = "trials.csv"
BEST_CONFIG_FILE = "best_config.yaml"
SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"


@dataclass
class SweepSpec:
    base: str | None
    overrides: list[str] = field(default_factory=list)
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    num_samples: int = 1
    metric: str = "subset_knn_top1"
    mode: str = "max"
    asha: dict[str, Any] | None = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    max_concurrent_trials: int = 1
    trial_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.1})
    mlflow: dict[str, str] | None = None
    seed: int = 0

    def base_config(self, extra: list[str] | tuple[str, ...] = ()) -> ExcbConfig:
        return load_config(self.base, [*self.overrides, *extra])


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read and check a sweep file; ``overrides`` (``section.key=value``) are appended to its fixed overrides.

    Every swept key must be a known config key; values are checked per trial, so one bad value fails one trial."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"sweep file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    known = set(SweepSpec.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown} in {p} (known: {', '.join(sorted(known))})")
    base = raw.pop("base", None)
    if base is not None and not Path(base).is_absolute() and not Path(base).exists():
        base = str((p.parent / base).resolve()) if (p.parent / base).exists() else base
    spec = SweepSpec(base=base, **raw)
    spec.overrides = [*spec.overrides, *overrides]
    cfg = spec.base_config()  # base + fixed overrides must be valid on their own
    mid_epoch = [k for k in ("checkpoint_every_steps", "checkpoint_every_minutes")
                 if getattr(cfg.train, k) is not None or f"train.{k}" in spec.space]
    if mid_epoch:  # every report reaches Tune as one iteration: schedulers count epochs
        raise ConfigError(f"train.{mid_epoch[0]}: sweeps checkpoint at epoch ends only (each report is one Tune "
                          "iteration); leave it null")
    for key, dom in spec.space.items():
        section, _, name = key.partition(".")
        if not hasattr(cfg, section) or not hasattr(getattr(cfg, section), name):
            raise ConfigError(f"space: unknown config key '{key}'")
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in SPACE_KINDS:
            raise ConfigError(f"space.{key}: must be one of {{{' | '.join(SPACE_KINDS)}: [...]}}, got {dom!r}")
        kind, values = next(iter(dom.items()))
        if not isinstance(values, list) or not values or (kind not in ("grid", "choice") and len(values) != 2):
            raise ConfigError(f"space.{key}.{kind}: needs a list ({'values' if kind in ('grid', 'choice') else '[low, high]'})")
        if kind == "loguniform" and not 0 < values[0] < values[1]:
            raise ConfigError(f"space.{key}.loguniform: needs 0 < low < high, got {values}")
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"mode: must be max or min, got {spec.mode!r}")
    if spec.num_samples < 1 or spec.max_concurrent_trials < 1:
        raise ConfigError("num_samples and max_concurrent_trials must be >= 1")
    return spec


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune search space: grid → grid_search, choice, uniform, loguniform, randint (high exclusive)."""
    from ray import tune

    make = {"grid": lambda v: tune.grid_search(v), "choice": lambda v: tune.choice(v),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, dom in spec.space.items() for kind, values in dom.items()}


def trial_overrides(config: dict[str, Any]) -> list[str]:
    """A trial's sampled values as ``section.key=value`` overrides (values JSON-encoded, which YAML reads back)."""
    return [f"{k}={json.dumps(v)}" for k, v in sorted(config.items()) if "." in k]


def run_trial(config: dict[str, Any], spec: dict[str, Any], experiment: str) -> None:
    """Tune function trainable: the trial's config, then a ``TorchTrainer`` whose per-epoch reports reach Tune
    (``TuneReportCallback``). The Train run lives in ``experiment/runs/<trial_id>`` and resumes from there when
    the trial is restarted."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from excb.run.pretrain import build_trainer
    from excb.run.startup import start_driver

    cfg = SweepSpec(**spec).base_config(trial_overrides(config))  # a bad value fails this trial only, naming the key
    cfg.eval.final_eval = False
    cfg = start_driver(cfg, start_ray=False)  # inside the trial: Ray is running already
    trial_id = tune.get_context().get_trial_id()
    trainer, _info = build_trainer(cfg, join(experiment, RUNS_DIR), trial_id,
                                   callbacks=[TuneReportCallback()])
    trainer.fit()


def _callbacks(spec: SweepSpec) -> list[Any]:
    """Tune's CSV and JSON result files and TensorBoard events per trial; MLflow when the sweep asks for it."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    callbacks: list[Any] = [CSVLoggerCallback(), JsonLoggerCallback(), TBXLoggerCallback()]
    if spec.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=spec.mlflow.get("tracking_uri"),
                                              experiment_name=spec.mlflow.get("experiment", "excb"),
                                              save_artifact=False))
    return callbacks


def build_tuner(spec: SweepSpec, storage_path: str, name: str) -> Any:
    """A new Tuner, or the restored one when ``storage_path/name`` holds an interrupted sweep (finished trials are
    kept, unfinished ones resumed, errored ones left as they are)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    experiment = join(storage_path, name)
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec.__dict__, experiment=experiment),
                                    spec.trial_resources)
    if tune.Tuner.can_restore(experiment):
        console.info(f"resuming sweep {experiment}")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    epochs = spec.base_config().train.epochs
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, **spec.asha) if spec.asha else FIFOScheduler())
    return tune.Tuner(
        trainable, param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=spec.seed,
                                                                     max_concurrent=spec.max_concurrent_trials),
                                    num_samples=spec.num_samples),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=_callbacks(spec),
                                  verbose=2 if console.is_verbose() else 1))  # 1: no per-report result tables


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def trials_table(results: Any, spec: SweepSpec, experiment: str) -> list[dict[str, Any]]:
    """One row per trial: id, status, swept values, final and best metric, epochs run, wall time, error.

    Epochs and metrics come from the trial's own Train run (``runs/<trial_id>/metrics.jsonl``) when it exists:
    a trial that ASHA stops can finish the epoch it was in before it is stopped, and Tune's record ends earlier."""
    from excb.rundir.runfiles import read_metrics
    from excb.storage import exists

    pick = max if spec.mode == "max" else min
    rows = []
    for r in results:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or Path(r.path).name
        run_dir = join(experiment, RUNS_DIR, trial_id)
        history = read_metrics(run_dir) if exists(join(run_dir, "metrics.jsonl")) else []
        if history:
            values = [_finite(h.get(spec.metric)) for h in history]
            epochs = int(history[-1]["epoch"])
        else:
            df = r.metrics_dataframe
            values = [_finite(v) for v in (df[spec.metric].tolist() if df is not None and spec.metric in df else [])]
            epochs = int(metrics.get("epoch", 0) or 0)
        values = [v for v in values if v is not None]
        row: dict[str, Any] = {"trial_id": trial_id, "status": "ERROR" if r.error else "TERMINATED"}
        row.update({k: r.config.get(k) for k in spec.space})
        row.update({f"final_{spec.metric}": values[-1] if values else None,
                    f"best_{spec.metric}": pick(values) if values else None,
                    "epochs": epochs, "wall_seconds": _finite(metrics.get("time_total_s")),
                    "error": str(r.error).strip().splitlines()[-1][:300] if r.error else ""})
        rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run_sweep(spec: SweepSpec, storage_path: str = "runs", name: str = "sweep",
              num_cpus: int | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; write trials.csv, best_config.yaml and sweep.json; return the sweep summary."""
    from excb.run.startup import start_driver
    from excb.storage import absolute

    storage_path = absolute(storage_path)
    # Trials run in their own working directories: pin the data path, and prepare the data once, here.
    cfg = start_driver(spec.base_config(), num_cpus=num_cpus)
    if "://" not in cfg.data.path:
        spec.overrides = [*spec.overrides, f"data.path={cfg.data.path}"]
    grid = build_tuner(spec, storage_path, name).fit()
    experiment = join(storage_path, name)
    rows = trials_table(grid, spec, experiment)
    write_text(join(experiment, TRIALS_FILE), _csv(rows))
    key = f"best_{spec.metric}"
    done = [r for r in rows if r[key] is not None]
    summary: dict[str, Any] = {"experiment": experiment, "trials": len(rows),
                               "errored": sum(r["status"] == "ERROR" for r in rows), "metric": spec.metric,
                               "mode": spec.mode, "space": spec.space}
    if done:
        best = (max if spec.mode == "max" else min)(done, key=lambda r: r[key])
        best_cfg = spec.base_config(trial_overrides({k: best[k] for k in spec.space}))
        write_text(join(experiment, BEST_CONFIG_FILE),
                   f"# best trial {best['trial_id']} of sweep {experiment}: {key} = {best[key]:.4f}\n"
                   + dump_yaml(best_cfg))
        summary.update(best_trial=best["trial_id"], best_value=best[key],
                       best_config={k: best[k] for k in spec.space})
    write_json(join(experiment, SWEEP_FILE), summary)
    return summary
