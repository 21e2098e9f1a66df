"""End to end through Ray: prepare → pretrain (Ray Data → Ray Train) → evaluate (API and CLI) → report, resume,
NaN stop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from testkit.configs import TINY

from excb.cli import main as cli_main
from excb.config import load_config
from excb.evaluation.evaluate import evaluate_run
from excb.evaluation.report import plot_run
from excb.run.pretrain import TrainingError, run_pretraining
from excb.rundir.checkpoint import list_checkpoints, read_state_dir, staging_root
from excb.rundir.runfiles import read_metrics, read_summary
from excb.storage import absolute, join

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _cfg(shards: str, *extra: str):
    return load_config(None, [*TINY, f"data.path={shards}", *extra])


def _printed_json(out: str) -> dict:
    """The last indented JSON object printed (``{`` and ``}`` on lines of their own), among Ray's log lines."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:lines.index("}", start) + 1]))


def test_prepare_pretrain_evaluate_report(ray_session: None, shards: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(Path(shards).parent)  # relative data path, as in the shipped configs
    summary = run_pretraining(_cfg(Path(shards).name, "train.epochs=2", "train.log_every_steps=2"),
                              storage_path=str(tmp_path), name="run")
    run_dir = tmp_path / "run"
    out = capfd.readouterr().out
    assert "epoch 1/2 step 2/5 | loss " in out and "ETA epoch" in out  # one progress line per log interval
    # TensorBoard by default: per log step (steps 2, 4 of each 5-step epoch) and per epoch
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 7, 9]
    assert {"train/lr", "train/teacher_confidence", "train/changed_by_balancing"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("epoch/subset_knn_top1")] == [5, 10]
    assert [e.step for e in acc.Scalars("epoch/estimate_max_cluster_share_x_uniform")] == [5, 10]
    history = read_metrics(str(run_dir))
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[-1]["step"] == 2 * 5  # 320 rows // 64 = 5 steps per epoch
    assert all(r["images_per_second"] > 0 and "subset_knn_top1" in r for r in history)
    on_disk = read_summary(str(run_dir))
    for key in ("knn_top1", "prototypes_used", "max_cluster_share_x_uniform", "epochs", "wall_seconds",
                "images_per_second", "nmi", "normalized_entropy", "estimate_normalized_entropy"):
        assert key in on_disk, key
    assert on_disk["epochs"] == 2 and on_disk["eval_train_rows"] == 320 and on_disk["eval_test_rows"] == 320
    assert 10.0 < on_disk["knn_top1"] <= 100.0  # ten classes: chance is 10 %
    assert 0 < on_disk["prototypes_used"] <= 1
    assert summary["knn_top1"] == on_disk["knn_top1"]
    ckpts = list_checkpoints(str(run_dir))
    assert [Path(c).name for c in ckpts] == ["checkpoint_epoch0001", "checkpoint_epoch0002"]
    state = read_state_dir(ckpts[-1])
    assert state["epoch"] == 2 and state["step"] == 10 and "sizes" in state["balancer"]
    assert evaluate_run(str(run_dir))["knn_top1"] == pytest.approx(on_disk["knn_top1"])
    capfd.readouterr()
    assert cli_main(["evaluate", str(run_dir)]) == 0  # the command: the same evaluation, printed as JSON
    printed = _printed_json(capfd.readouterr().out)
    assert printed["epochs"] == 2 and "nmi" in printed
    assert printed["knn_top1"] == pytest.approx(on_disk["knn_top1"]) == read_summary(str(run_dir))["knn_top1"]
    pngs = plot_run(str(run_dir))
    assert {Path(p).name for p in pngs} == {"loss.png", "knn.png", "clusters.png"}
    assert all(Path(p).stat().st_size > 1000 for p in pngs)


def test_relaunch_resumes_instead_of_restarting(ray_session: None, shards: str, tmp_path: Path) -> None:
    data = tmp_path / "fm"
    shutil.copytree(shards, data)
    run_pretraining(_cfg(str(data), "train.epochs=1", "eval.final_eval=false"), storage_path=str(tmp_path), name="r")
    first = read_metrics(str(tmp_path / "r"))
    assert len(first) == 1
    finished = run_pretraining(_cfg(str(data), "train.epochs=2", "eval.final_eval=false"),
                               storage_path=str(tmp_path), name="r")
    second = read_metrics(str(tmp_path / "r"))
    assert [r["epoch"] for r in second] == [1, 2]
    assert second[0] == first[0]  # epoch 1 was not trained again
    assert second[1]["step"] == 10
    # a finished run relaunched trains nothing more, and starts no worker group to find that out; nor does it read
    # an image (the data counts come from its summary): it succeeds with every training shard unreadable
    train_shards = sorted((data / "train").glob("*.parquet"))
    assert train_shards
    for shard in train_shards:
        shard.write_bytes(b"not parquet")
    again = run_pretraining(_cfg(str(data), "train.epochs=2", "eval.final_eval=false"), storage_path=str(tmp_path),
                            name="r")
    assert read_metrics(str(tmp_path / "r")) == second
    assert again["fit_seconds"] == 0.0 and again["epochs"] == 2
    assert (again["train_rows"], again["corrupt_images"]) == (finished["train_rows"], finished["corrupt_images"]) == (
        320, 0)
    shutil.rmtree(data)
    shutil.copytree(shards, data)
    # checkpoints are staged locally and the staged copies removed once persisted: nothing is left behind
    staging = Path(staging_root(join(absolute(str(tmp_path)), "r")))
    assert not staging.exists() or list(staging.iterdir()) == []
    # a corrupted newest checkpoint is detected; the relaunch resumes from the one before and redoes epoch 2; what
    # a killed attempt left in the staging folder is cleared by the next one
    state_file = tmp_path / "r" / "checkpoint_epoch0002" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-100])
    (staging / "epoch-killed").mkdir(parents=True)
    (staging / "epoch-killed" / "state.pt").write_bytes(b"x" * 1000)
    redone = run_pretraining(_cfg(str(data), "train.epochs=2", "eval.final_eval=false"), storage_path=str(tmp_path),
                             name="r")
    assert redone["fit_seconds"] > 0
    assert not staging.exists() or list(staging.iterdir()) == []
    third = read_metrics(str(tmp_path / "r"))
    assert [r["epoch"] for r in third] == [1, 2] and third[0] == first[0] and third[1]["step"] == 10
    assert third[1]["epoch_seconds"] != second[1]["epoch_seconds"]  # epoch 2 was trained again
    assert read_state_dir(str(tmp_path / "r" / "checkpoint_epoch0002"))["epoch"] == 2  # and rewritten whole


def test_nan_loss_stops_and_keeps_last_good_checkpoint(ray_session: None, shards: str, tmp_path: Path) -> None:
    run_pretraining(_cfg(shards, "train.epochs=1", "eval.final_eval=false"), storage_path=str(tmp_path), name="n")
    with pytest.raises(TrainingError, match=r"non-finite loss \(loss is (nan|inf) at epoch \d+, step \d+\); "
                                             r"last good checkpoint: \S+checkpoint_epoch0001"):
        run_pretraining(_cfg(shards, "train.epochs=3", "optim.lr=1e38", "optim.warmup_epochs=0",
                             "eval.final_eval=false"), storage_path=str(tmp_path), name="n")
    ckpts = list_checkpoints(str(tmp_path / "n"))
    assert [Path(c).name for c in ckpts] == ["checkpoint_epoch0001"]
    assert read_state_dir(ckpts[-1])["epoch"] == 1


def test_cli_rejects_unknown_key_before_starting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = cli_main(["pretrain", "--storage-path", str(tmp_path), "train.epochz=3"])
    assert code == 2
    assert "train.epochz" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_cli_missing_dataset_says_how_to_get_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = cli_main(["pretrain", "--storage-path", str(tmp_path), "data.dataset=shards",
                     f"data.path={tmp_path / 'nowhere'}"])
    assert code == 2
    assert "excb prepare" in capsys.readouterr().err
