"""Elastic training on a simulated two-node cluster (``ray.cluster_utils.Cluster``): a node is removed during
training and the run continues with one worker from its last checkpoint; the node comes back and the run grows
to two workers again. Batch, learning rate and steps follow the documented policy (excb.run.scaling)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testkit.configs import TINY

from excb.config import load_config
from excb.data import prepare_fashion_mnist
from excb.method.schedules import build_schedules
from excb.run.pretrain import run_pretraining
from excb.run.scaling import plan_for
from excb.rundir.runfiles import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROWS = 2000
SLOT = {"excb_slot": 1}  # one training worker per node
# The run must outlast the two resizes. Measured here (2026-12-04, 2-core Xeon): epoch 1 on 2 workers, epoch 2 on 1
# after the node loss, epochs 3-4 on 1 worker while the node came back (the resize came ~12 s after it was added),
# epoch 5 on 2 workers again. 10 epochs leave 7 one-worker epochs (~35-50 s) for the regrowth; 14 spent ~40 s more.
EPOCHS = 10


@pytest.fixture()
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A head node (2 CPUs) and one worker node (1 CPU), each with one training slot; fast node-death detection.
    After the node loss Ray Train first tries the full group again and gives up after its worker-group start
    timeout (60 s by default) before it shrinks. 30 s leaves room for a slow machine to start one TINY worker (it
    passed here at 20 s); Ray Train reads it from the driver's environment."""
    import ray

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    ray.shutdown()  # one Ray instance at a time: the shared test instance steps aside
    # Cluster() writes the head's address into Ray's default temp folder and fails where no Ray ran before (a fresh
    # machine running this file alone); its shutdown removes the address file again.
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": SLOT,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    c.add_node(num_cpus=1, resources=SLOT)
    ray.init(address=c.address, logging_level=logging.WARNING)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _wait_for(run_dir: Path, alive: Any, predicate: Any, what: str) -> list[dict[str, Any]]:
    while alive():
        if (run_dir / "metrics.jsonl").exists():
            history = read_metrics(str(run_dir))
            if predicate(history):
                return history
        time.sleep(0.2)
    raise AssertionError(f"the run ended before {what}")


def test_node_removed_then_added_shrinks_and_grows(cluster: Any, tmp_path: Path) -> None:
    shards = str(tmp_path / "fm")
    prepare_fashion_mnist(shards, limit=ROWS, rows_per_shard=500)
    cfg = load_config(None, [*TINY, f"data.path={shards}", f"train.epochs={EPOCHS}", "train.num_workers=[1,2]",
                             "train.max_failures=-1", "train.cpus_per_worker=0.25", "train.worker_resources={excb_slot: 1}",
                             "train.elastic_resize_interval_s=2", "eval.final_eval=false", "eval.epoch_knn_train=0"])
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["summary"] = run_pretraining(cfg, str(tmp_path), "elastic")
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    run_dir = tmp_path / "elastic"
    _wait_for(run_dir, thread.is_alive, lambda h: any(r["workers"] == 2 for r in h), "an epoch on 2 workers")
    (worker_node,) = cluster.worker_nodes
    cluster.remove_node(worker_node, allow_graceful=False)
    shrunk = _wait_for(run_dir, thread.is_alive, lambda h: h[-1]["workers"] == 1, "an epoch on 1 worker")
    cluster.add_node(num_cpus=1, resources=SLOT)
    _wait_for(run_dir, thread.is_alive, lambda h: len(h) > len(shrunk) and h[-1]["workers"] == 2,
              "an epoch on 2 workers after the node came back")
    thread.join()
    assert "error" not in result, result.get("error")

    history = read_metrics(str(run_dir))
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))  # each epoch once across the resizes
    workers = [r["workers"] for r in history]
    first_one = workers.index(1)
    assert 2 in workers[:first_one] and 2 in workers[first_one:]
    for r in history:  # fixed per-worker batch, lr scaled linearly, epoch length from the global batch
        plan = plan_for(cfg, r["workers"], ROWS)
        assert r["global_batch"] == 32 * r["workers"] == plan.global_batch
        assert r["steps_per_epoch"] == ROWS // plan.global_batch
        assert r["step"] == r["epoch"] * plan.steps_per_epoch
        lr = build_schedules(cfg, plan.steps_per_epoch, lr_scale=plan.lr_scale).lr[r["step"] - 1]
        assert r["lr"] == pytest.approx(float(lr))
    assert result["summary"]["workers_per_epoch"] == workers
