"""Stored teacher features (excb.evaluation.features) and the distributed kNN over them
(excb.evaluation.distributed_knn): Parquet round trip, reuse by checkpoint hash, backbone mismatch, chunking and
the kNN task without Ray; then, through Ray, features over 2 actors equal to one process's, reuse and recompute,
the distributed kNN equal to the in-memory one, and a run whose data and run directory are on S3."""

from __future__ import annotations

import dataclasses
import itertools
import json
import mmap
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from testkit.fake_run import make_run

from excb.data import load_split_arrays
from excb.data.errors import DatasetNotFoundError
from excb.data.shards import list_shards
from excb.evaluation.distributed_knn import (
    PeakRss,
    chunk_rows,
    knn_chunk,
    knn_distributed,
    knn_top1_distributed,
)
from excb.evaluation.evaluate import extract_features
from excb.evaluation.features import (
    MARKER_FILE,
    BackboneMismatchError,
    FeatureSet,
    TeacherFeatures,
    _summarise,
    extract_split_features,
    feature_folder,
    features_table,
    open_feature_set,
)
from excb.evaluation.metrics import knn_top1
from excb.method.augment import MultiCropAugment
from excb.rundir.checkpoint import (
    checkpoint_dir_name,
    list_checkpoints,
    write_state_dir,
)

CONVNET = ["model.backbone=convnet", "model.convnet_widths=[8,16]", "model.convnet_pool=2", "data.channels=1",
           "augment.global_size=28", "data.image_size=28"]


def _sha(checkpoint: str) -> str:
    return json.loads(Path(checkpoint, "state.json").read_text())["sha256"]


def _write_set(folder: Path, tables: list, sha: str = "f" * 64, split: str = "train") -> FeatureSet:
    """Parquet files by hand, as extract_split_features leaves them, and the FeatureSet read back."""
    folder.mkdir(parents=True)
    for i, t in enumerate(tables):
        pq.write_table(t, folder / f"part-{i}.parquet")
    files, rows, lo, hi = _summarise(str(folder))
    marker = {"version": 1, "sha256": sha, "split": split, "rows": rows, "dim": tables[0]["feature"].type.list_size,
              "files": files, "labelled": rows > 0 and lo >= 0, "num_classes": hi + 1 if lo >= 0 else 0,
              "data_path": "/nowhere", "limit": None}
    (folder / MARKER_FILE).write_text(json.dumps(marker))
    got = open_feature_set(str(folder))
    assert got is not None
    return got


def test_teacher_features_match_extract_features_and_round_trip(tmp_path: Path) -> None:
    """The actor's batches are extract_features' numbers; unlabelled rows keep label -1; blocks and load read the
    files back in order, block_rows at a time."""
    _, teacher, cfg = make_run(str(tmp_path / "run"), CONVNET)
    ckpt = list_checkpoints(str(tmp_path / "run"))[0]
    import pyarrow.fs as pafs

    actor = TeacherFeatures(pafs.LocalFileSystem(), ckpt, _sha(ckpt))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 1, 28, 28), generator=gen, dtype=torch.uint8)
    ids = np.array([f"row-{i}" for i in range(30)], dtype=object)
    ref_f, ref_a = extract_features(teacher, MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std), images)
    tables = [actor({"id": ids[a:b], "image": images[a:b].numpy(), "label": np.full(b - a, -1)})
              for a, b in ((0, 12), (12, 30))]
    assert str(tables[0].schema.field("feature").type) == "fixed_size_list<item: float>[64]"
    fs = _write_set(tmp_path / "feats", tables)
    assert (fs.rows, fs.dim, fs.labelled, fs.num_classes, len(fs.files)) == (30, 64, False, 0, 2)
    got_ids, feats, labels, assign = fs.load()
    assert got_ids == list(ids) and (labels == -1).all()
    torch.testing.assert_close(feats, ref_f, rtol=1e-5, atol=1e-5)
    assert torch.equal(assign, ref_a)
    pinned = dataclasses.replace(fs, filesystem=pafs.LocalFileSystem())  # as a Ray task gets it: fs not resolved
    assert pinned == fs and pinned.load()[0] == got_ids
    blocks = list(fs.blocks(block_rows=5))
    assert [b[0].shape[0] for b in blocks] == [5, 5, 2, 5, 5, 5, 3]
    torch.testing.assert_close(torch.cat([b[0] for b in blocks]), feats)


def test_backbone_mismatch_names_both_before_any_work(tmp_path: Path) -> None:
    state, _, _ = make_run(str(tmp_path / "run"), CONVNET)
    state["config"]["model"]["backbone"] = "resnet18_small"  # the config says ResNet, the weights are a ConvNet's
    bad = write_state_dir(state, str(tmp_path / "run" / checkpoint_dir_name(2)))
    with pytest.raises(BackboneMismatchError, match=r"configured backbone is 'resnet18_small'.*those of 'convnet'"):
        extract_split_features(str(tmp_path / "run"), bad, "train", data_path=str(tmp_path / "no-data"))
    assert not (tmp_path / "run" / "features").exists()


def test_reuse_by_marker_without_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A marker naming this checkpoint, data path and limit, with its files present: returned as is (Ray Data is
    never reached: decoded_split would fail on the missing data)."""
    run = tmp_path / "run"
    make_run(str(run), [*CONVNET, f"data.path={tmp_path / 'no-data'}"])
    ckpt = list_checkpoints(str(run))[0]
    sha = _sha(ckpt)
    t = features_table(["a", "b"], [1, 2], torch.ones(2, 64), torch.zeros(2, dtype=torch.long))
    folder = Path(feature_folder(str(run), sha, "test", limit=2))
    assert folder == run / "features" / sha[:16] / "test-first2"
    made = _write_set(folder, [t], sha=sha, split="test")
    marker = json.loads((folder / MARKER_FILE).read_text())
    no_data = str(tmp_path / "no-data")
    (folder / MARKER_FILE).write_text(json.dumps({**marker, "data_path": no_data, "config_data_path": no_data,
                                                  "limit": 2}))
    got = extract_split_features(str(run), ckpt, "test", limit=2)
    assert got == made and got.num_classes == 3 and got.labelled
    assert extract_split_features(str(run), ckpt, "test", limit=2, data_path=no_data) == made
    with pytest.raises(DatasetNotFoundError, match="other/no-data"):  # another data path: recomputed, i.e. read from the data
        extract_split_features(str(run), ckpt, "test", limit=2, data_path=str(tmp_path / "other" / "no-data"))


def test_chunks_cover_every_row_once() -> None:
    for rows, n in (([100, 100, 120], 2), ([7, 1, 0, 30], 5), ([3], 8)):
        chunks = chunk_rows(rows, n)
        assert len(chunks) == min(n, sum(rows))
        seen = [(f, r) for chunk in chunks for f, a, b in chunk for r in range(a, b)]
        assert seen == [(f, r) for f, m in enumerate(rows) for r in range(m)]
        sizes = [sum(b - a for _, a, b in chunk) for chunk in chunks]
        assert max(sizes) - min(sizes) <= 1


def test_knn_task_equals_in_memory_knn(tmp_path: Path) -> None:
    """knn_chunk (one task's work, run here) streaming train files in blocks: the in-memory kNN's neighbours."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    ytr, yte = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (90,), generator=g)
    xtr, xte = centres[ytr] + torch.randn(300, 16, generator=g), centres[yte] + torch.randn(90, 16, generator=g)
    zero = torch.zeros(1, dtype=torch.long)

    def tables(x: torch.Tensor, y: torch.Tensor, cuts: list[int]) -> list:
        return [features_table([str(i) for i in range(a, b)], y[a:b], x[a:b], zero.expand(b - a))
                for a, b in itertools.pairwise(cuts)]

    train = _write_set(tmp_path / "train", tables(xtr, ytr, [0, 100, 250, 300]))
    test = _write_set(tmp_path / "test", tables(xte, yte, [0, 40, 90]), split="test")
    truth = knn_top1(xtr, ytr, xte, yte, k=20, temperature=0.07)
    votes = 0
    for chunk in chunk_rows(test.file_rows(), 3):
        sims, labels, y, stats = knn_chunk(train, test, chunk, 20, 64, 16)
        assert sims.shape == (y.numel(), 20) and stats.rows == y.numel() and stats.peak_rss >= stats.start_rss > 0
        w = torch.zeros(y.numel(), 4).scatter_add_(1, labels, (sims / 0.07).exp())
        votes += int((w.argmax(1) == y).sum())
    assert 100.0 * votes / 90 == pytest.approx(truth, abs=1e-4)
    with pytest.raises(ValueError, match="labels on both splits"):
        unlabelled = tables(xte, torch.full((90,), -1), [0, 90])
        knn_distributed(train, _write_set(tmp_path / "u", unlabelled, split="test"))
    # Fresh anonymous pages, so the growth is seen whatever the allocator kept from earlier tests (an np.ones of
    # 20 MB came from already resident heap on one CI machine and RSS did not move).
    with mmap.mmap(-1, 32 * 2**20) as pages:
        with PeakRss() as rss:
            np.frombuffer(pages, dtype=np.uint8)[:] = 1
    assert rss.peak - rss.start >= 24 * 2**20


@pytest.mark.ray
def test_features_two_actors_reuse_and_distributed_knn(ray_session: None, shards: str, tmp_path: Path) -> None:
    """(a) features over 2 actors equal one process's extract_features by id; (b) a second call reuses them and
    a marker of another checkpoint makes them be recomputed; (c) the distributed kNN equals the in-memory one."""
    run = str(tmp_path / "run")
    _, teacher, cfg = make_run(run, [*CONVNET, f"data.path={shards}"])
    ckpt = list_checkpoints(run)[0]
    kw = {"concurrency": 2, "batch_size": 64, "num_cpus_per_actor": 0.5, "rows_per_file": 100}
    train = extract_split_features(run, ckpt, "train", **kw)
    assert (train.rows, train.dim, train.labelled, train.num_classes) == (320, 64, True, 10)
    assert len(train.files) >= 2 and train.folder == feature_folder(run, _sha(ckpt), "train")

    images, labels = load_split_arrays(shards, "train", image_size=28, channels=1)
    ids = pq.read_table(list_shards(shards, "train"), columns=["id"])["id"].to_pylist()
    ref_f, ref_a = extract_features(teacher, MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std),
                                    torch.from_numpy(images))
    got_ids, feats, got_labels, assign = train.load()
    order = [got_ids.index(i) for i in ids]
    assert sorted(got_ids) == sorted(ids)
    torch.testing.assert_close(feats[order], ref_f, rtol=1e-4, atol=1e-5)
    assert torch.equal(assign[order], ref_a) and torch.equal(got_labels[order], torch.from_numpy(labels))

    # (b) reuse, then recompute after a marker from another checkpoint
    folder = Path(train.folder)
    marker_file = folder / MARKER_FILE
    before = marker_file.stat().st_mtime_ns, sorted(os.listdir(folder))
    assert extract_split_features(run, ckpt, "train", **kw) == train
    assert (marker_file.stat().st_mtime_ns, sorted(os.listdir(folder))) == before
    stale = json.loads(marker_file.read_text())
    marker_file.write_text(json.dumps({**stale, "sha256": "0" * 64}))
    again = extract_split_features(run, ckpt, "train", **kw)
    assert json.loads(marker_file.read_text())["sha256"] == _sha(ckpt)
    assert not set(again.files) & set(train.files)  # the old files were removed, new ones written
    assert sorted(os.listdir(folder)) == sorted([*again.files, MARKER_FILE])

    # (c) distributed kNN (2 tasks; then 7 chunks of ≤ 50 rows, 2 at a time) vs the in-memory kNN
    test = extract_split_features(run, ckpt, "test", **kw)
    _, te_f, te_y, _ = test.load()
    _, tr_f, tr_y, _ = again.load()
    expected = knn_top1(tr_f, tr_y, te_f, te_y, k=20, temperature=0.07)
    import ray

    def worker_pid() -> int:  # defined here so that it is pickled by value (workers cannot import this module)
        return os.getpid()

    pid_task = ray.remote(worker_pid).options(num_cpus=0.5)
    task_workers = set(ray.get([pid_task.remote() for _ in range(4)]))
    assert knn_top1_distributed(again, test, workers=2, block_rows=64) == pytest.approx(expected, abs=0.01)
    result = knn_distributed(again, test, workers=2, block_rows=50, max_chunk_rows=50)
    assert result.top1 == pytest.approx(expected, abs=0.01) and result.rows == 320
    assert len(result.peak_rss_bytes) == 7 and all(p > 0 for p in result.peak_rss_bytes)
    # the kNN ran in workers of its own, not in those that ran earlier tasks (their heap would count)
    knn_workers = {t.pid for t in result.tasks}
    assert knn_workers and 0 not in knn_workers and not knn_workers & task_workers


@pytest.mark.ray
def test_evaluation_of_a_run_on_s3(ray_session: None, s3_endpoint: str, s3_bucket: str) -> None:
    """Data, checkpoint and features all on the local S3 server: features written under the s3 run dir, the
    distributed kNN equal to the in-memory one. The storage options carry the credentials (Ray's workers, started
    before the fixture set the AWS variables, get them only inside the filesystems handed to them)."""
    import excb.storage
    from excb.config import StorageConfig
    from excb.data import prepare_fashion_mnist
    from excb.storage import exists, join

    excb.storage.configure(StorageConfig(endpoint_url=s3_endpoint, region="us-east-1", access_key_id="test",
                                         secret_access_key="test"))
    data, run = f"{s3_bucket}/fm", f"{s3_bucket}/run"
    prepare_fashion_mnist(data, limit=160, rows_per_shard=80)
    make_run(run, [*CONVNET, f"data.path={data}"])
    ckpt = list_checkpoints(run)[0]
    kw = {"concurrency": 1, "batch_size": 64, "num_cpus_per_actor": 0.5, "rows_per_file": 80}
    train = extract_split_features(run, ckpt, "train", **kw)
    test = extract_split_features(run, ckpt, "test", **kw)
    assert train.folder.startswith(f"{run}/features/") and exists(join(train.folder, MARKER_FILE))
    assert (train.rows, test.rows, train.dim) == (160, 160, 64)
    _, tr_f, tr_y, _ = train.load()
    _, te_f, te_y, _ = test.load()
    expected = knn_top1(tr_f, tr_y, te_f, te_y, k=20, temperature=0.07)
    assert knn_top1_distributed(train, test, workers=2, block_rows=64) == pytest.approx(expected, abs=0.01)
    assert extract_split_features(run, ckpt, "test", **kw) == test  # reused from s3
    from excb.evaluation.evaluate import evaluate_run

    quick = evaluate_run(run, engine="ray", knn_only=True)  # what `excb evaluate RUN --knn-only` runs
    assert quick["knn_top1"] == pytest.approx(expected, abs=0.01) and quick["eval_train_rows"] == 160


def test_cli_evaluate_refuses_a_mismatched_backbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from excb.cli import main as cli_main

    state, _, _ = make_run(str(tmp_path / "run"), CONVNET)
    state["config"]["model"]["backbone"] = "resnet18_small"
    write_state_dir(state, str(tmp_path / "run" / checkpoint_dir_name(2)))
    assert cli_main(["evaluate", str(tmp_path / "run"), "--engine", "ray"]) == 2
    assert "configured backbone is 'resnet18_small'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "features").exists()


@pytest.mark.ray
def test_evaluate_engines_agree_reuse_features_and_skip_unlabelled(ray_session: None, shards: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """excb evaluate through Ray Data features + the distributed kNN gives the in-memory evaluation's numbers; a
    second (--knn-only) evaluation reuses the stored features; the streaming probe runs when the features are
    "too large"; an unlabelled split skips kNN and the probe with a message and keeps the cluster health."""
    from excb.cli import main as cli_main
    from excb.evaluation.evaluate import choose_engine, evaluate_run
    from excb.evaluation.stored_eval import evaluate_stored

    run = tmp_path / "run"
    _, _, cfg = make_run(str(run), [*CONVNET, f"data.path={shards}", "eval.feature_workers=2",
                                    "train.torch_threads=1"])
    assert choose_engine(cfg, shards, "auto") == "memory"  # 320 × 28² bytes
    memory = evaluate_run(str(run), engine="memory")
    assert cli_main(["evaluate", str(run), "--engine", "ray", "--no-write"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert (memory["eval_engine"], stored["eval_engine"]) == ("memory", "ray")
    assert stored["knn_top1"] == pytest.approx(memory["knn_top1"], abs=0.01)
    assert stored["linear_fit"] == "lbfgs" and stored["linear_top1"] == pytest.approx(memory["linear_top1"], abs=1.0)
    for key in ("nmi", "ari", "cluster_acc_hungarian", "cluster_acc_majority", "prototypes_used",
                "max_cluster_share_x_uniform", "normalized_entropy"):
        assert stored[key] == pytest.approx(memory[key], abs=1e-9), key
    assert (stored["eval_train_rows"], stored["eval_test_rows"]) == (320, 320)

    markers = sorted(run.glob(f"features/*/*/{MARKER_FILE}"))
    assert len(markers) == 2
    written = [m.stat().st_mtime_ns for m in markers]
    quick = evaluate_run(str(run), engine="ray", knn_only=True)
    assert "linear_top1" not in quick and quick["knn_top1"] == stored["knn_top1"]
    assert [m.stat().st_mtime_ns for m in markers] == written  # reused, not recomputed

    train_dir, test_dir = (str(m.parent) for m in sorted(markers, key=lambda m: m.parent.name != "train"))
    train, test = open_feature_set(train_dir), open_feature_set(test_dir)
    assert train is not None and test is not None and train.split == "train"
    streaming_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, linear_in_memory_mb=0,
                                                                      linear_stream_batch_size=32))
    streamed = evaluate_stored(train, test, streaming_cfg, workers=1, num_cpus_per_task=0.5)
    assert streamed["linear_fit"] == "streaming_sgd" and streamed["linear_top1"] > 40.0  # chance: 10 %
    unlabelled = evaluate_stored(train, dataclasses.replace(test, labelled=False, num_classes=0), cfg, workers=1)
    assert unlabelled["labels_missing"] == "the test split has no labels"
    assert "knn_top1" not in unlabelled and "nmi" not in unlabelled
    assert unlabelled["prototypes_used"] == stored["prototypes_used"]
    assert "kNN and the linear probe skipped: the test split has no labels" in capsys.readouterr().out
