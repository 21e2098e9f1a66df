"""The weight-layout comparison (experiments/weight_layout_ab.py): its three arms start from the same weights and
differ only in memory layout, and a measurement reports every arm against the NCHW-weights arm."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))  # the script imports benchlib from beside it
_spec = importlib.util.spec_from_file_location("weight_layout_ab", ROOT / "experiments" / "weight_layout_ab.py")
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)

TINY = ["model.convnet_widths=[8,16]", "model.projector_hidden=32", "model.predictor_hidden=32",
        "model.num_prototypes=16", "augment.num_local=2", "train.batch_size=4"]


def _weights(learner) -> list[torch.Tensor]:
    return [p for p in learner.student.parameters() if p.ndim == 4]


def test_arms_start_equal_and_differ_only_in_layout() -> None:
    arms = ab.learners(TINY, torch.device("cpu"))
    assert set(arms) == {"nhwc", ab.BEFORE, "nchw"}
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _weights(arms["nhwc"]))
    assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in _weights(arms[ab.BEFORE])
                   if p.shape[1] > 1)  # (a weight with one input channel is both)
    assert arms[ab.BEFORE].cfg.model.channels_last and not arms["nchw"].cfg.model.channels_last
    for a, b, c in zip(*(arm.student.parameters() for arm in arms.values())):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_measurement_reports_each_arm_against_nchw_weights() -> None:
    threads = torch.get_num_threads()
    try:
        r = ab.measure("tiny", TINY, 2, torch.device("cpu"), random.Random(0))
    finally:
        torch.set_num_threads(threads)  # measure() sets the process's threads, as the script does
    assert set(r["median_ms"]) == {"nhwc", ab.BEFORE, "nchw"} and all(v > 0 for v in r["median_ms"].values())
    ratios = r["ratio_to_" + ab.BEFORE]
    assert ratios[ab.BEFORE] == 1.0
    assert ratios["nhwc"] == r["median_ms"]["nhwc"] / r["median_ms"][ab.BEFORE]
    assert r["torch_threads"] == 1 and r["rounds"] == 2 and r["batch"] == 4
