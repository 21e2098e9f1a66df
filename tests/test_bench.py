"""``excb bench`` end to end through Ray on a tiny config, ``train.max_steps_per_epoch`` and ``train.compile``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from testkit.configs import TINY

from excb.cli import main as cli_main
from excb.config import load_config
from excb.method.learner import ExcbLearner
from excb.method.model import build_student_teacher
from excb.run.bench import PHASES, steady_epoch
from excb.run.scaling import plan_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bench_writes_all_measurements(ray_session: None, shards: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    config = str(ROOT / "experiments" / "fashion_mnist.yaml")
    argv = ["bench", "--config", config, "--steps", "3", "--warmup", "1", "--out", str(out),
            "--storage-path", str(tmp_path / "runs"), *TINY, f"data.path={shards}"]
    assert cli_main(argv) == 0
    r = json.loads(out.read_text())
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file and a rename
    assert r["command"].startswith("excb bench --config ") and f"data.path={shards}" in r["command"]
    assert {"cores", "cpu", "memory_gib", "python", "torch", "ray"} <= set(r["machine"])
    s = r["settings"]
    assert (s["backbone"], s["batch"], s["train_rows"], s["steps"], s["compile"]) == ("convnet", 64, 320, 3, False)
    for key in ("data", "synthetic", "plain", "end_to_end"):
        assert r[key]["images_per_second"] > 0 and math.isfinite(r[key]["images_per_second"]), key
    assert r["data"]["steps"] == 3 and r["data"]["passes"] == 1  # 1 + 3 batches of the 5 a pass holds
    assert r["synthetic"]["steps"] == r["plain"]["steps"] == 3
    assert set(r["synthetic"]["phase_ms"]) == set(PHASES)
    assert all(v > 0 for v in r["synthetic"]["phase_ms"].values())
    assert sum(r["synthetic"]["phase_share"].values()) == pytest.approx(1.0)
    assert math.isfinite(r["synthetic"]["final_loss"])
    e2e = r["end_to_end"]
    assert e2e["steps"] == 3 and e2e["batch"] == 64  # train.max_steps_per_epoch capped the 5-step epoch
    assert 0.0 <= e2e["data_wait_fraction"] <= 1.0 and 0.0 <= e2e["epoch_data_wait_fraction"] <= 1.0
    assert e2e["images_per_second"] >= e2e["epoch_images_per_second"]  # the first batch's wait left out
    ratios = r["ratios"]
    assert ratios["end_to_end_over_synthetic"] == pytest.approx(
        e2e["images_per_second"] / r["synthetic"]["images_per_second"])
    assert ratios["ray_over_plain"] == pytest.approx(e2e["images_per_second"] / r["plain"]["images_per_second"])
    assert ratios["data_over_synthetic"] == pytest.approx(
        r["data"]["images_per_second"] / r["synthetic"]["images_per_second"])
    # the Ray Train run was the bench's: per-epoch kNN off, two epochs of three steps, kept under --storage-path
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"]) for m in rows] == [(1, 3), (2, 6)]
    assert not any(k.startswith("subset_") for k in rows[-1])
    assert steady_epoch(rows[-1])["images_per_second"] == pytest.approx(e2e["images_per_second"])
    printed = capsys.readouterr().out
    assert "Ray Train 1 worker / plain loop" in printed and "loss_backward" in printed


def test_max_steps_per_epoch_caps_the_plan() -> None:
    cfg = load_config(None, ["train.batch_size=64", "train.max_steps_per_epoch=3"])
    assert plan_for(cfg, 1, 320).steps_per_epoch == 3
    assert plan_for(cfg, 1, 128).steps_per_epoch == 2  # a shorter pass is not lengthened
    assert plan_for(load_config(None, ["train.batch_size=64"]), 1, 320).steps_per_epoch == 5
    with pytest.raises(ValueError, match="max_steps_per_epoch"):
        load_config(None, ["train.max_steps_per_epoch=-1"])


@pytest.mark.skipif(sys.platform != "linux", reason="inductor's CPU backend is exercised on Linux")
@pytest.mark.slow  # inductor compiles in worker processes
def test_compiled_backbones_train_with_a_finite_loss() -> None:
    cfg = load_config(None, [*TINY, "train.compile=true", "train.batch_size=16"])
    torch.set_num_threads(1)
    learner = ExcbLearner(cfg, 4, device=torch.device("cpu"))
    eager_student, _ = build_student_teacher(load_config(None, TINY))
    assert set(learner.student.state_dict()) == set(eager_student.state_dict())  # in place: checkpoint keys unchanged
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    losses = [learner.step(x).loss for _ in range(2)]
    assert all(math.isfinite(v) for v in losses)
    backbone = learner.teacher.backbone
    assert backbone._compiled_call_impl is not None
    views = learner.augment(x, 0.5, torch.Generator().manual_seed(1))
    both = torch.cat(views[:2]).contiguous(memory_format=torch.channels_last)  # the teacher's input in a step
    with torch.no_grad():  # the compiled module computes what the eager forward computes
        torch.testing.assert_close(backbone(both), backbone.forward(both), atol=1e-4, rtol=1e-4)
