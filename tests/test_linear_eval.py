"""``excb linear``: its config, heads, views and class count without Ray, and the Ray Train job end to end with a
worker SIGKILLed after the first epoch (resumed from its checkpoint) and a relaunch of the finished evaluation."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from testkit.fake_run import make_run
from testkit.processes import train_worker_pids

from excb.config import ConfigError, load_config
from excb.linear.config import LinearConfig, linear_from_dict, load_linear_config
from excb.linear.heads import LinearHeads, cosine_factor, set_lrs, topk_correct
from excb.linear.views import eval_view, train_view

ROOT = Path(__file__).resolve().parent.parent
CONVNET = ["model.backbone=convnet", "model.convnet_widths=[8,16]", "model.convnet_pool=2", "data.channels=1",
           "augment.global_size=28", "data.image_size=28"]


def test_shipped_configs_and_the_released_vit_grid() -> None:
    vit = load_linear_config(ROOT / "experiments/linear/imagenet_vits16.yaml")
    lrs = vit.head_lrs()
    assert len(lrs) == 58 and lrs[0] == pytest.approx(0.0005) and lrs[-1] == pytest.approx(0.029)
    assert 0.004 in [round(v, 6) for v in lrs] and (vit.batch_size, vit.weight_decay) == (1024, 0.0)
    resnet = load_linear_config(ROOT / "experiments/linear/imagenet_resnet50.yaml")
    assert (resnet.epochs, resnet.batch_size, resnet.lr, resnet.weight_decay, resnet.head_lrs()) == \
        (100, 256, 0.3, 1e-6, [0.3])
    assert (resnet.crop_size, resnet.crop_scale, resnet.eval_resize, resnet.eval_crop) == (224, [0.08, 1.0], 256, 224)
    assert load_linear_config(ROOT / "experiments/linear/fashion_mnist.yaml").head_lrs() == \
        pytest.approx([0.1, 0.3, 0.5])


@pytest.mark.parametrize("override,key", [
    ("epochs=0", "epochs"), ("lr=0", "lr"), ("batch_size=10", "batch_size"), ("crop_scale=[0.5,0.2]", "crop_scale"),
    ("eval_crop=300", "eval_crop"), ("precision=fp8", "precision"), ("colour=red", "linear.colour"),
    ("name=a/b", "name"),
])
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_linear_config(None, [override, "num_workers=4"] if key == "batch_size" else [override])


def test_heads_start_equal_and_step_at_their_own_learning_rates() -> None:
    heads = LinearHeads(6, 3, [0.1, 0.4], seed=0)
    w0 = [h.weight.detach().clone() for h in heads.heads]
    assert torch.equal(w0[0], w0[1]) and float(w0[0].std()) == pytest.approx(0.01, rel=0.5)
    opt = heads.optimizer(momentum=0.9, weight_decay=0.0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    logits = heads(x)
    assert logits.shape == (2, 8, 3)
    heads.loss(logits, y).backward()
    g = heads.heads[0].weight.grad.clone()
    set_lrs(opt, cosine_factor(5, 10))  # half way: factor 0.5
    opt.step()
    for head, lr, w in zip(heads.heads, heads.lrs, w0, strict=True):  # first step: buffer = gradient
        torch.testing.assert_close(head.weight.detach(), w - 0.5 * lr * g)
    assert cosine_factor(0, 10) == 1.0 and cosine_factor(10, 10) == pytest.approx(0.0)


def test_topk_counts_match_a_brute_force_count() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 50, 10, generator=gen), torch.randint(0, 10, (50,), generator=gen)
    top1, top5 = topk_correct(logits, labels)
    for h in range(3):
        ranks = [(logits[h, i] > logits[h, i, labels[i]]).sum().item() for i in range(50)]
        assert top1[h] == sum(r == 0 for r in ranks) and top5[h] == sum(r < 5 for r in ranks)


def test_views_crop_where_they_should() -> None:
    cfg = LinearConfig(crop_size=8, crop_scale=[0.5, 1.0], eval_resize=16, eval_crop=8)
    img = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    img[:, :, 4:12, 4:12] = 255  # a bright centre square: exactly the 8-px centre crop
    centre = eval_view(img, cfg, [0.0], [1.0])
    assert centre.shape == (2, 1, 8, 8) and torch.allclose(centre, torch.ones_like(centre))
    # training crops stay inside the valid region of a fitted canvas (top-left 16x8, the rest padding)
    canvas = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    canvas[:, :, :, :8] = 200
    valid = torch.tensor([[16, 8]] * 4)
    views = train_view(canvas, valid, cfg, [0.0], [1.0], torch.Generator().manual_seed(0))
    assert views.shape == (4, 1, 8, 8) and views.min() > 0.7  # no padding (0) sampled


def test_class_count_from_shards(fm_shards: Any) -> None:
    from excb.linear.job import count_classes

    shards = fm_shards()
    cfg = load_config(None, [f"data.path={shards}"])
    assert count_classes(cfg, shards) == 10
    with pytest.raises(ValueError, match="num_classes"):
        count_classes(load_config(None, ["data.dataset=synthetic", "data.format=webdataset"]), shards)


def test_previous_evaluation_is_reported_again_only_when_finished_and_of_the_same_checkpoint(tmp_path: Path) -> None:
    """The driver's relaunch decision: a finished evaluation with its counts is reported again (also from a moved
    run folder), an unfinished or unsummarised one runs, and one of another pretraining checkpoint is refused."""
    from excb.linear.job import previous_evaluation
    from excb.rundir.checkpoint import checkpoint_dir_name, write_state_dir
    from excb.rundir.runfiles import write_summary

    out = str(tmp_path / "run" / "linear")
    ckpt = str(tmp_path / "run" / "checkpoint_epoch0001")
    assert previous_evaluation(out, 8, ckpt) is None  # nothing yet

    def save(epoch: int) -> None:
        write_state_dir({"heads": {"w": torch.zeros(2)}, "epoch": epoch, "step": 10 * epoch,
                         "pretraining_checkpoint": ckpt}, f"{out}/{checkpoint_dir_name(epoch)}")

    save(3)
    assert previous_evaluation(out, 8, ckpt) is None  # more to train
    with pytest.raises(ValueError, match=r"checkpoint_epoch0001.*checkpoint_epoch0002.*name="):
        previous_evaluation(out, 8, str(tmp_path / "run" / "checkpoint_epoch0002"))
    save(8)
    assert previous_evaluation(out, 8, ckpt) is None  # finished, but no summary with the data counts
    write_summary(out, {"top1": 71.5, "train_rows": 320, "num_classes": 10})
    assert previous_evaluation(out, 8, ckpt) == {"train_rows": 320, "num_classes": 10}
    assert previous_evaluation(out, 8, "/moved/run/checkpoint_epoch0001/") == {"train_rows": 320, "num_classes": 10}
    assert previous_evaluation(out, 9, ckpt) is None  # asked for more epochs: the job resumes
    with pytest.raises(ValueError, match="another name"):
        previous_evaluation(out, 8, str(tmp_path / "run" / "checkpoint_epoch0002"))


@pytest.mark.ray
def test_linear_job_resumes_after_a_killed_worker(ray_session: None, shards: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """2 workers, 8 epochs of 10 steps (320 images, batch 32), validation every epoch: a worker SIGKILLed after
    epoch 1; the group restarts from the epoch-1 checkpoint (its history row kept as it was), every epoch once,
    every validation image scored once per pass across the ranks, top-1 above chance; relaunching the finished
    evaluation trains nothing and reports the same numbers."""
    from excb.cli import main as cli_main
    from excb.linear.job import run_linear
    from excb.rundir.checkpoint import list_checkpoints, read_state_dir, staging_root
    from excb.rundir.runfiles import read_metrics

    run = tmp_path / "run"
    make_run(str(run), [*CONVNET, f"data.path={shards}"])
    lc = linear_from_dict({"epochs": 8, "batch_size": 32, "num_workers": 2, "cpus_per_worker": 0.5,
                           "torch_threads": 1, "max_failures": 2, "lr": 10.0, "lr_heads": 3, "lr_interval": 5.0,
                           "crop_size": 28, "crop_scale": [0.5, 1.0], "eval_resize": 28, "eval_crop": 28,
                           "eval_every_epochs": 1, "precision": "fp32"})
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["summary"] = run_linear(str(run), lc)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    out = run / "linear"
    before: list[dict[str, Any]] = []
    while thread.is_alive() and not before:
        if (out / "metrics.jsonl").exists():
            before = read_metrics(str(out))
        time.sleep(0.1)
    victims = train_worker_pids()
    assert before and victims, (before, victims)
    os.kill(victims[0], signal.SIGKILL)
    thread.join()
    assert "error" not in result, result.get("error")
    history = read_metrics(str(out))
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert history[0] == before[0]  # epoch 1 came from its checkpoint, it was not trained again
    assert all(r["val_rows"] == 320 for r in history)
    summary = result["summary"]
    assert summary["epochs"] == 8 and summary["val_rows"] == 320 and summary["heads"] == 3
    # ten classes: chance is 10 %; this random ConvNet's features are small (std ~0.06), hence the large lrs
    assert summary["best_top1"] >= summary["top1"] > 15.0  # 3 standard errors above chance on 320 rows
    assert 0 < summary["top1"] <= summary["top5"] <= 100
    assert min(abs(summary["best_lr"] - v) for v in (5.0, 10.0, 15.0)) < 1e-9
    state = read_state_dir(list_checkpoints(str(out))[-1])
    assert state["epoch"] == 8 and state["step"] == 80 and len(list_checkpoints(str(out))) <= 2 + 2
    staging = Path(staging_root(str(out)))
    assert not staging.exists() or list(staging.iterdir()) == []

    capsys.readouterr()  # the relaunch reads no image: it succeeds with the training data pointed nowhere
    assert cli_main(["linear", str(run), "epochs=8", "batch_size=32", "num_workers=2", "cpus_per_worker=0.5",
                     "lr=10", "lr_heads=3", "lr_interval=5", "crop_size=28", "eval_resize=28", "eval_crop=28",
                     f"data_path={tmp_path / 'nowhere'}"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed
    assert f"linear evaluation top-1: {summary['top1']:.2f}%" in printed
    assert read_metrics(str(out)) == history  # nothing trained again
    assert json.loads((out / "summary.json").read_text())["top1"] == summary["top1"]
