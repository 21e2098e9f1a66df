"""What a quiet ``excb pretrain`` prints, checked on its captured output (a subprocess's or a submitted job's)."""

from __future__ import annotations

import re
from collections import Counter


def excb_lines(text: str) -> list[str]:
    """Every ``[excb] ...`` line, with Ray's ``(RayTrainWorker pid=...)`` prefix taken off."""
    return [line[line.index("[excb]"):] for line in text.splitlines() if "[excb]" in line]


def assert_quiet_pretrain_output(text: str, epochs: int, steps: int) -> None:
    """The output of ``excb pretrain`` without ``--verbose`` and with ``train.log_every_steps=1``: none of Ray
    Train's per-report lines, Ray Data's execution notices or the libraries' deprecation warnings; each ``[excb]``
    line once; one summary line per epoch and one progress line per step."""
    tail = text[-5000:]
    assert "TrainingReport(" not in text and "Reporting training result" not in text, tail
    assert "DeprecationWarning" not in text and "FutureWarning" not in text, tail
    assert "Starting execution of Dataset" not in text and "execution finished" not in text, tail
    lines = excb_lines(text)
    assert [n for n, c in Counter(lines).items() if c > 1] == [], lines  # each of our lines exactly once
    done = [m.group(1) for line in lines if (m := re.match(rf"\[excb\] epoch (\d+)/{epochs} loss ", line))]
    assert done == [str(e) for e in range(1, epochs + 1)], lines
    progress = re.compile(rf"\[excb\] epoch (\d+)/{epochs} step (\d+)/{steps} \| loss \S+ \| \S+ img/s \| "
                          r"data wait \S+ \| ETA epoch \S+, run \S+$")
    assert sorted((int(a), int(b)) for line in lines if (m := progress.match(line)) for a, b in [m.groups()]) == [
        (e, s) for e in range(1, epochs + 1) for s in range(1, steps + 1)], lines  # one per log interval
