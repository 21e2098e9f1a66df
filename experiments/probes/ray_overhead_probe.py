"""Where the Ray Train worker loses time against a plain loop: the same synthetic Fashion-MNIST ConvNet step
(batch 256, 2 threads, 15 steps after 4) timed in the driver without Ray, in the driver with an idle local Ray
instance up, in a Ray actor's main thread, in a thread of a Ray actor, and in a Ray Train worker.

    .venv/bin/python experiments/probes/ray_overhead_probe.py
    RAY_enable_metrics_collection=0 .venv/bin/python experiments/probes/ray_overhead_probe.py   # without Ray's metrics
"""

import os
import sys
import threading
import time
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "experiments" / "fashion_mnist.yaml")

def timing(tag: str) -> dict:
    """ms per step of the synthetic step in the calling process/thread, with its thread settings."""
    from excb.config import load_config
    from excb.method.learner import ExcbLearner

    cfg = load_config(CONFIG, ["method.kmeans_init=false"])
    torch.set_num_threads(2)
    learner = ExcbLearner(cfg, 60)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=g)
    for _ in range(4): learner.step(x)
    t = time.perf_counter()
    for _ in range(15): learner.step(x)
    dt = (time.perf_counter() - t) / 15
    info = dict(tag=tag, ms=round(1000 * dt, 1), threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"),
                mkl=os.environ.get("MKL_NUM_THREADS"), main=threading.current_thread() is threading.main_thread(),
                affinity=len(os.sched_getaffinity(0)), ld=os.environ.get("LD_PRELOAD"))

    return info

if __name__ == "__main__":
    print(timing("driver-main"))  # before ray.init
    ray.init(num_cpus=2)
    print(timing("driver-with-ray-up"))
    @ray.remote(num_cpus=1)
    class A:
        def run(self): return timing("actor-main")
        def run_thread(self):
            out = {}
            th = threading.Thread(target=lambda: out.update(timing("actor-thread"))); th.start(); th.join(); return out
    a = A.remote()
    print(ray.get(a.run.remote()))
    print(ray.get(a.run_thread.remote()))
    import ray.train
    import ray.train.torch
    from ray.train.torch import TorchTrainer
    def loop(config):
        print(timing("train-worker"), file=sys.__stdout__, flush=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=ray.train.RunConfig(storage_path=tmp, name="probe")).fit()
