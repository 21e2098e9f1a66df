"""Files of a run directory that scripts and dashboards read without parsing logs.

    RUN_DIR/config.yaml       the resolved configuration
    RUN_DIR/metrics.jsonl     one JSON object per finished epoch (rewritten atomically from the checkpointed history)
    RUN_DIR/summary.json      final evaluation and run totals
    RUN_DIR/plots/*.png       drawn by ``excb report``
    RUN_DIR/sample_ids/       with ``train.record_sample_ids``: the ids each rank consumed, per stretch of a pass
                              that ended in a checkpoint (epochNNNN-rankR-FIRST-END-<attempt>.txt)
    RUN_DIR/resume/           while an epoch resumed inside is running: the id hashes it leaves out
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from excb.storage import exists, join, read_text, write_json, write_text

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
SAMPLE_IDS_DIR = "sample_ids"


def write_metrics(run_dir: str, history: list[dict[str, Any]]) -> None:
    write_text(join(run_dir, METRICS_FILE), "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    uri = join(run_dir, METRICS_FILE)
    if not exists(uri):
        return []
    return [json.loads(line) for line in read_text(uri).splitlines() if line.strip()]


def write_summary(run_dir: str, summary: dict[str, Any]) -> None:
    write_json(join(run_dir, SUMMARY_FILE), summary)


def read_summary(run_dir: str) -> dict[str, Any]:
    return json.loads(read_text(join(run_dir, SUMMARY_FILE)))


def summary_counts(run_dir: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, int] | None:
    """The integer counts ``required`` and ``optional`` (0 where absent) from the run's ``summary.json``, with which
    a relaunch of a finished job reports again without reading its data. ``None`` when there is no readable summary,
    or a required count is missing, or a count is not an integer."""
    try:
        summary = read_summary(run_dir)
        return {**{key: _count(summary[key]) for key in required},
                **{key: _count(summary.get(key, 0)) for key in optional}}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _count(value: Any) -> int:
    """``value`` as a count: an int (or an integral float, as JSON may give it); ValueError/TypeError otherwise."""
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"not a count: {value!r}")
    return int(value)
