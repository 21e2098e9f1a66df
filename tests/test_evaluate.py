"""evaluate_teacher's metrics (kNN, linear probe, NMI, ARI, cluster accuracies, cluster health) and
``excb evaluate`` with the embedding plot, on runs written by hand (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit.fake_run import make_run
from testkit.images import quadrant_images

from excb.cli import main as cli_main
from excb.evaluation.evaluate import evaluate_teacher
from excb.method.augment import MultiCropAugment

CONVNET = ["model.backbone=convnet", "model.convnet_widths=[8,16]", "model.convnet_pool=2", "data.channels=1",
           "augment.global_size=28"]
CLUSTER_KEYS = {"nmi", "ari", "cluster_acc_hungarian", "cluster_acc_majority"}
HEALTH_KEYS = {"prototypes_used", "max_cluster_share_x_uniform", "min_cluster_share_x_uniform",
               "normalized_entropy"}


def test_evaluate_teacher_keys_and_values(tmp_path: Path) -> None:
    _, teacher, cfg = make_run(str(tmp_path / "run"), CONVNET)
    augment = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    gen = torch.Generator().manual_seed(0)
    trx, try_ = quadrant_images(400, gen)
    tex, tey = quadrant_images(200, gen)
    full = evaluate_teacher(teacher, augment, trx, try_, tex, tey, k=10, temperature=0.07)  # train.py's call form
    assert set(full) == {"knn_top1", "linear_top1"} | CLUSTER_KEYS | HEALTH_KEYS
    # The quadrant patterns are linearly separable in a random ConvNet's pooled 2×2 features.
    assert full["linear_top1"] > 95.0 and full["knn_top1"] > 80.0
    assert 0.0 <= full["cluster_acc_hungarian"] <= full["cluster_acc_majority"] <= 100.0
    assert -0.5 <= full["ari"] <= 1.0 and 0.0 <= full["nmi"] <= 1.0
    per_epoch = evaluate_teacher(teacher, augment, trx, try_, tex, tey, k=10, temperature=0.07, linear_probe=False)
    assert set(per_epoch) == set(full) - {"linear_top1"}
    assert all(per_epoch[k] == full[k] for k in per_epoch)
    # Prototypes at the teacher's class-mean projections of the train split (the rest pointing away): the
    # test split's assignments recover its labels.
    with torch.no_grad():
        teacher.eval()
        h = torch.nn.functional.normalize(teacher.projector(teacher.backbone(augment.plain(trx))), dim=1)
        means = torch.stack([h[torch.from_numpy(try_) == c].mean(0) for c in range(4)])
        teacher.prototypes.weight.copy_(torch.cat([means, -h.mean(0).expand(8, -1)]))
    clustered = evaluate_teacher(teacher, augment, trx, try_, tex, tey, k=10, temperature=0.07)
    assert clustered["cluster_acc_hungarian"] > 90.0 and clustered["nmi"] > 0.7 and clustered["ari"] > 0.7
    assert clustered["prototypes_used"] == pytest.approx(4 / 12)
    # Labels shuffled against the images: the probe falls to about chance (25 %).
    shuffled = evaluate_teacher(teacher, augment, trx, np.random.default_rng(0).permutation(try_), tex, tey)
    assert shuffled["linear_top1"] < 45.0
    unlabelled = evaluate_teacher(teacher, augment, trx, -np.ones_like(try_), tex, -np.ones_like(tey))
    assert set(unlabelled) == HEALTH_KEYS


def test_cli_evaluate_with_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from excb.data import prepare_fashion_mnist
    from excb.data.fashion_mnist import SYSTEM_DIR

    if not (Path(SYSTEM_DIR) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {SYSTEM_DIR}")
    shards = str(tmp_path / "fm")
    prepare_fashion_mnist(shards, limit=300, rows_per_shard=200)
    run = tmp_path / "run"
    make_run(str(run), [*CONVNET, f"data.path={shards}", "train.torch_threads=1"])
    assert cli_main(["evaluate", str(run), "--plot", "--plot-points", "250"]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    for key in {"knn_top1", "linear_top1", "embedding_plot"} | CLUSTER_KEYS | HEALTH_KEYS:
        assert key in printed and summary[key] == printed[key], key
    assert printed["eval_train_rows"] == 300 and printed["eval_test_rows"] == 300
    assert printed["linear_top1"] > 40.0  # ten classes: chance is 10 %; random ConvNet features carry signal
    png = run / "plots" / "embedding_pca.png"
    assert printed["embedding_plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["evaluate", str(run), "--no-write", "--no-linear-probe"]) == 0
    assert "linear_top1" not in json.loads(capsys.readouterr().out)
    before = (run / "summary.json").read_text()
    assert cli_main(["evaluate", str(run), "--limit", "120", "--no-linear-probe"]) == 0
    quick = json.loads(capsys.readouterr().out)
    assert quick["eval_train_rows"] == 120 and quick["eval_test_rows"] == 120 and "knn_top1" in quick
    assert (run / "summary.json").read_text() == before  # a quick look does not replace the full numbers
    assert cli_main(["evaluate", str(run), "--limit", "-1"]) == 2
