"""Reference scores (excb/evaluation/reference.py): raw pixels and the untrained network evaluated as the model
is, cached per dataset and settings; printed and stored next to the model's scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit.fake_run import make_run
from testkit.images import quadrant_images

from excb.cli import main as cli_main
from excb.config import load_config
from excb.evaluation import reference, report
from excb.evaluation.evaluate import evaluate_run, extract_features
from excb.evaluation.metrics import knn_top1, linear_probe_top1
from excb.evaluation.reference import REFERENCE_KEYS, compute_reference_scores, reference_lines, reference_scores
from excb.evaluation.report import plot_run
from excb.method.augment import MultiCropAugment
from excb.method.learner import ExcbLearner

CONVNET = ["model.backbone=convnet", "model.convnet_widths=[8,16]", "model.convnet_pool=2", "data.channels=1",
           "augment.global_size=28", "model.num_prototypes=12", "model.projector_hidden=32",
           "model.projector_out=16", "model.predictor_hidden=32"]


def _images(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    return quadrant_images(n, torch.Generator().manual_seed(seed))


def test_scores_are_the_evaluation_of_pixels_and_of_the_run_starting_network() -> None:
    cfg = load_config(None, CONVNET)
    trx, try_ = _images(300, 0)
    tex, tey = _images(120, 1)
    scores = compute_reference_scores(cfg, trx, try_, tex, tey)
    assert set(scores) == set(REFERENCE_KEYS)
    augment = MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std)
    ytr, yte = torch.from_numpy(try_), torch.from_numpy(tey)
    ptr, pte = augment.plain(trx).flatten(1), augment.plain(tex).flatten(1)
    assert scores["raw_pixels_knn_top1"] == pytest.approx(knn_top1(ptr, ytr, pte, yte, 20, 0.07))
    assert scores["raw_pixels_linear_top1"] == pytest.approx(linear_probe_top1(ptr, ytr, pte, yte))
    # the untrained network is the one a run of this config starts from (the learner's teacher before any step)
    start = ExcbLearner(cfg, steps_per_epoch=1).teacher
    ftr, _ = extract_features(start, augment, trx)
    fte, _ = extract_features(start, augment, tex)
    assert scores["random_init_knn_top1"] == pytest.approx(knn_top1(ftr, ytr, fte, yte, 20, 0.07))
    assert scores["random_init_linear_top1"] == pytest.approx(linear_probe_top1(ftr, ytr, fte, yte))
    # and drawing the network leaves the caller's random stream where it was
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    compute_reference_scores(cfg, trx[:60], try_[:60], tex[:30], tey[:30], linear_probe=False)
    assert torch.equal(torch.rand(3), expected)
    assert {"raw_pixels_linear_top1", "random_init_linear_top1"}.isdisjoint(
        compute_reference_scores(cfg, trx[:60], try_[:60], tex[:30], tey[:30], linear_probe=False))


def test_cached_per_dataset_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, CONVNET)
    trx, try_ = _images(120, 0)
    tex, tey = _images(60, 1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"train_rows": 120}))
    first = reference_scores(cfg, str(data), trx, try_, tex, tey)
    assert first == compute_reference_scores(cfg, trx, try_, tex, tey)
    files = sorted((reference.cache_dir() / "reference").glob("*.json"))
    assert len(files) == 2 and {k for f in files for k in json.loads(f.read_text())} == set(REFERENCE_KEYS)

    calls: list[tuple[str, ...]] = []

    def counted(*args: object, parts: tuple[str, ...] = (), **kw: object) -> dict[str, float]:
        calls.append(parts)
        return {k: 1.0 for k in REFERENCE_KEYS if k.startswith(parts)}

    monkeypatch.setattr(reference, "compute_reference_scores", counted)
    assert reference_scores(cfg, str(data), trx, try_, tex, tey) == first and not calls  # from the cache
    reference_scores(load_config(None, [*CONVNET, "eval.knn_k=5"]), str(data), trx, try_, tex, tey)
    assert calls == [("raw_pixels",), ("random_init",)]
    calls.clear()  # another prototype count or seed: only the untrained network is scored again
    reference_scores(load_config(None, [*CONVNET, "model.num_prototypes=24"]), str(data), trx, try_, tex, tey)
    reference_scores(load_config(None, [*CONVNET, "train.seed=3"]), str(data), trx, try_, tex, tey)
    assert calls == [("random_init",), ("random_init",)]
    calls.clear()
    (data / "meta.json").write_text(json.dumps({"train_rows": 121}))  # the dataset was prepared again
    reference_scores(cfg, str(data), trx, try_, tex, tey)
    reference_scores(cfg, str(data), trx, try_, tex, tey, limit=50)
    assert len(calls) == 4
    calls.clear()
    for f in files:
        f.write_text("{not json")  # a damaged cache entry is recomputed, not trusted
    (data / "meta.json").write_text(json.dumps({"train_rows": 120}))
    assert reference_scores(cfg, str(data), trx, try_, tex, tey) == {k: 1.0 for k in REFERENCE_KEYS}
    assert len(calls) == 2


def test_evaluate_prints_and_stores_references_and_plots_them(tmp_path: Path, fm_shards,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shards = fm_shards(300)
    run = tmp_path / "run"
    make_run(str(run), [*CONVNET, f"data.path={shards}", "train.torch_threads=1"])
    assert cli_main(["evaluate", str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    for key in REFERENCE_KEYS:
        assert 10.0 < printed[key] <= 100.0 and summary[key] == printed[key], key
    assert printed["raw_pixels_knn_top1"] != printed["random_init_knn_top1"]
    lines = reference_lines(summary)
    assert len(lines) == 2 and "raw pixels" in lines[0] and "untrained network" in lines[0]
    gain = summary["knn_top1"] - summary["raw_pixels_knn_top1"]
    assert f"{gain:+.2f} points" in lines[0]
    assert reference_lines({"knn_top1": 80.0}) == []
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 5.0, "subset_knn_top1": 70.0,
                                                   "estimate_max_cluster_share_x_uniform": 1.5,
                                                   "teacher_confidence": 0.5}) + "\n")
    legends = {}
    real_save = report.save_figure

    def keep_legend(fig, uri: str, integer_x: bool = True) -> str:  # type: ignore[no-untyped-def]
        legends[Path(uri).name] = [t.get_text() for ax in fig.axes if ax.get_legend()
                                   for t in ax.get_legend().get_texts()]
        return real_save(fig, uri, integer_x)

    monkeypatch.setattr(report, "save_figure", keep_legend)
    assert any(p.endswith("knn.png") for p in plot_run(str(run)))
    assert legends["knn.png"] == ["model (per-epoch subset)", "model (final, all images)",
                                  "raw pixels (all images)", "untrained network (all images)"]
    # turned off in the config: no reference keys
    off = tmp_path / "off"
    make_run(str(off), [*CONVNET, f"data.path={shards}", "train.torch_threads=1", "eval.reference_scores=false"])
    assert REFERENCE_KEYS[0] not in evaluate_run(str(off), knn_only=True)
