"""The run-directory files scripts read: summary counts for relaunches (excb.rundir.runfiles)."""

from __future__ import annotations

from pathlib import Path

import pytest

from excb.rundir.runfiles import read_summary, summary_counts, write_summary


def test_summary_counts_reads_required_and_optional_counts(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    assert summary_counts(run, ["train_rows"]) is None  # no summary yet
    write_summary(run, {"knn_top1": 71.5, "train_rows": 320, "num_classes": 10.0})
    assert read_summary(run)["knn_top1"] == 71.5
    assert summary_counts(run, ["train_rows", "num_classes"]) == {"train_rows": 320, "num_classes": 10}
    assert summary_counts(run, ["train_rows"], ["corrupt_images"]) == {"train_rows": 320, "corrupt_images": 0}
    assert summary_counts(run, ["train_rows", "corrupt_images"]) is None  # a required count is missing


@pytest.mark.parametrize("bad", [None, "320", 3.5, True, [320]])
def test_summary_counts_refuses_what_is_not_a_count(tmp_path: Path, bad: object) -> None:
    run = str(tmp_path / "run")
    write_summary(run, {"train_rows": 320, "corrupt_images": bad})
    assert summary_counts(run, ["train_rows"], ["corrupt_images"]) is None
    assert summary_counts(run, ["train_rows"]) == {"train_rows": 320}


def test_summary_counts_of_an_unreadable_summary_is_none(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{not json")
    assert summary_counts(str(tmp_path), ["train_rows"]) is None
