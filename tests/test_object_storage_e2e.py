"""Pretraining from and to object storage through Ray: shards read from s3://, checkpoints and results written to
an s3:// storage path, a relaunch resuming from there. The S3 server is a real ``moto_server`` process on loopback;
endpoint and credentials come from the config only (the AWS variables are unset), and the secret appears in no
log, output or saved file."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from testkit.configs import TINY
from testkit.proxy import TcpProxy

import excb.storage
from excb.config import load_config
from excb.data import prepare_fashion_mnist
from excb.run.pretrain import TrainingError, run_pretraining
from excb.rundir.checkpoint import list_checkpoints, read_state_dir
from excb.rundir.runfiles import read_metrics, read_summary
from excb.storage import StorageError, read_text

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SECRET = f"excb-secret-{uuid.uuid4().hex}"
KEY_ID = "AKIDEXCBTEST"


@pytest.fixture()
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    import boto3

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    name = f"excb-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                 region_name="us-east-1").create_bucket(Bucket=name)
    yield name
    excb.storage.configure(None)
    excb.storage.clear_cache()


def _cfg(endpoint: str, data: str, *extra: str):
    return load_config(None, [*TINY, f"data.path={data}", f"storage.endpoint_url={endpoint}",
                              "storage.region=us-east-1", f"storage.access_key_id={KEY_ID}",
                              f"storage.secret_access_key={SECRET}", "train.cpus_per_worker=0.5", *extra])


def test_pretrain_from_and_to_s3_and_resume(ray_session: None, s3_endpoint: str, bucket: str,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    data, runs = f"s3://{bucket}/fm", f"s3://{bucket}/runs"
    cfg = _cfg(s3_endpoint, data, "train.epochs=1", "eval.final_eval=false")
    excb.storage.configure(cfg.storage)
    prepare_fashion_mnist(data, limit=320, rows_per_shard=100)
    excb.storage.configure(None)  # from here on the run configures storage itself, from its config

    run_pretraining(cfg, storage_path=runs, name="s3run")
    first = read_metrics(f"{runs}/s3run")
    assert [r["epoch"] for r in first] == [1]
    summary = run_pretraining(_cfg(s3_endpoint, data, "train.epochs=2"), storage_path=runs, name="s3run")
    history = read_metrics(f"{runs}/s3run")
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == first[0]  # resumed from the s3 checkpoint
    assert read_summary(f"{runs}/s3run")["knn_top1"] == summary["knn_top1"] > 10.0
    ckpts = list_checkpoints(f"{runs}/s3run")
    assert [c.rsplit("/", 1)[-1] for c in ckpts] == ["checkpoint_epoch0001", "checkpoint_epoch0002"]
    state = read_state_dir(ckpts[-1])
    assert state["step"] == 10

    # the secret never leaves the config: not in output, saved config, checkpoint, or any Ray log
    saved = read_text(f"{runs}/s3run/config.yaml")
    assert SECRET not in saved and KEY_ID not in saved
    assert SECRET not in str(state["config"])
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for f in logs.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_missing_bucket_and_unreachable_endpoint_fail_before_workers(ray_session: None, s3_endpoint: str,
                                                                      bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="s3://no-such-bucket-excb/fm") as e:
        run_pretraining(_cfg(s3_endpoint, "s3://no-such-bucket-excb/fm"), storage_path=str(tmp_path), name="x")
    assert SECRET not in str(e.value)
    with pytest.raises(StorageError, match=f"s3://{bucket}/runs"):
        run_pretraining(_cfg("http://127.0.0.1:9", f"s3://{bucket}/fm", "storage.connect_timeout_s=1"),
                        storage_path=f"s3://{bucket}/runs", name="x")
    assert not (tmp_path / "x").exists()


def test_bucket_unreachable_mid_run_stops_naming_the_object_then_resumes(
        ray_session: None, s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    """Data streamed from s3:// through a forwarder that goes down after epoch 1: the run retries
    (storage.read_retries), then stops naming the object and the last good checkpoint, which is intact; with the
    bucket back, the same command resumes from it and finishes with every epoch once."""
    target = urlsplit(s3_endpoint)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 80)
    data = f"s3://{bucket}/fm"
    excb.storage.configure(_cfg(s3_endpoint, data).storage)
    prepare_fashion_mnist(data, limit=640, rows_per_shard=64)  # 10 shards, read again every epoch
    excb.storage.configure(None)
    cfg = _cfg(proxy.url, data, "train.epochs=3", "data.materialize=false", "storage.read_retries=2",
               "storage.connect_timeout_s=1", "storage.request_timeout_s=3", "eval.final_eval=false",
               "eval.epoch_knn_train=0")
    result: dict[str, BaseException] = {}

    def run() -> None:
        try:
            run_pretraining(cfg, storage_path=str(tmp_path), name="outage")
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        metrics = tmp_path / "outage" / "metrics.jsonl"
        while thread.is_alive() and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.05)
        proxy.down()
        thread.join(timeout=600)
        assert not thread.is_alive(), "the run did not stop while the bucket was unreachable"
        err = result.get("error")
        assert isinstance(err, TrainingError), err
        done = list_checkpoints(str(tmp_path / "outage"))
        assert done and len(read_metrics(str(tmp_path / "outage"))) == len(done) < 3
        message = str(err).splitlines()[0]
        named = rf"object storage unreachable: could not [a-z ]+ s3://{bucket}/fm/train(/part-\d+\.parquet)? after"
        assert re.search(named, message), message
        assert "after 2 tries" in message and f"last good checkpoint: {done[-1]}" in message
        assert SECRET not in str(err)
        read_state_dir(done[-1])  # intact: verifies and loads

        proxy.up()
        summary = run_pretraining(cfg, storage_path=str(tmp_path), name="outage")
        assert [r["epoch"] for r in read_metrics(str(tmp_path / "outage"))] == [1, 2, 3]
        assert summary["optimizer_steps"] == 3 * 10
    finally:
        proxy.close()
