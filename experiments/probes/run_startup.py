"""What a short pretraining run spends before and around its training steps, on the tiny test configuration
(``tests/testkit/configs.py``: 320 Fashion-MNIST rows, 5 steps): the fixed costs that every end-to-end test and
every small user run pays.

Measured in this process, after one warm-up run (so that Ray's worker pool is warm, as in a test session):

- ``ray_data_execution_s``: one Ray Data execution of a 10-row dataset (``materialize``): the executor's fixed
  start-up cost, which every separate pass over the data pays;
- ``training_dataset_s``: :func:`excb.run.pretrain.training_dataset`, the train split read, decoded and
  materialised on the driver;
- ``run_s``: one whole 1-epoch run through :func:`excb.run.pretrain.run_pretraining` (no final evaluation);

and in a fresh interpreter, ``import_worker_s``: importing :mod:`excb.run.worker`, which every Ray Train worker
process (and every process that unpickles the training function) pays. ``train_phases_s`` are Ray Train's own
timings of each worker-group start (its controller log): actors created, train context initialised, training
function launched, and the total.

    flock /tmp/excb-ray.lock .venv/bin/python experiments/probes/run_startup.py --repeats 3

Prints one JSON object with the medians and every sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "experiments"))


def _import_seconds() -> float:
    """Wall seconds to import the Train worker's module in a fresh interpreter (minus the interpreter's start)."""
    code = "import time; t = time.perf_counter(); import excb.run.worker; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _train_phases(session_dir: str) -> dict[str, list[float]]:
    """Ray Train's "[Worker Group Initialization] <phase> in <s>s" timings from this session's controller logs."""
    phases: dict[str, list[float]] = {}
    for log in sorted(Path(session_dir, "logs", "train").glob("ray-train-sys-controller-*.log")):
        for line in log.read_text().splitlines():
            try:
                message = json.loads(line)["message"]
            except (ValueError, KeyError):
                continue
            m = re.search(r"\[Worker Group Initialization\] (.+?) in ([0-9.]+)s", message)
            if m:
                phases.setdefault(m.group(1), []).append(float(m.group(2)))
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    from testkit.configs import TINY

    from excb.config import load_config
    from excb.data import prepare_fashion_mnist
    from excb.run.pretrain import run_pretraining, training_dataset

    samples: dict[str, list[float]] = {"import_worker_s": [], "ray_data_execution_s": [], "training_dataset_s": [],
                                       "run_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        prepare_fashion_mnist(f"{tmp}/fm", limit=320, rows_per_shard=100)
        cfg = load_config(None, [*TINY, f"data.path={tmp}/fm", "train.epochs=1", "eval.final_eval=false"])
        ray.init(logging_level=logging.WARNING)
        try:
            run_pretraining(cfg, tmp, "warm-up")
            for i in range(args.repeats):
                samples["import_worker_s"].append(_import_seconds())
                t = time.perf_counter()
                ray.data.range(10).materialize()
                samples["ray_data_execution_s"].append(time.perf_counter() - t)
                t = time.perf_counter()
                training_dataset(cfg)
                samples["training_dataset_s"].append(time.perf_counter() - t)
                t = time.perf_counter()
                run_pretraining(cfg, tmp, f"run{i}")
                samples["run_s"].append(time.perf_counter() - t)
            from ray._private import worker

            phases = _train_phases(worker._global_node.get_session_dir_path())
        finally:
            ray.shutdown()
    from benchlib import machine

    report = {"machine": machine(), "repeats": args.repeats,
              "median": {k: round(statistics.median(v), 2) for k, v in samples.items()},
              "samples": {k: [round(x, 2) for x in v] for k, v in samples.items()},
              "train_phases_s": {k: round(statistics.median(v), 2) for k, v in phases.items() if max(v) >= 0.1}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
