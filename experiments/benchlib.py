"""Shared by the benchmark scripts: a one-line description of the machine and an atomic append to RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "RESULTS.md"


def machine() -> str:
    """Cores, CPU model, memory, GPU and Python version of this machine."""
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {gpu}, Python {platform.python_version()}"


def append_results(lines: list[str], results: Path = RESULTS) -> None:
    """Append an entry to the results file through a temporary file and a rename."""
    text = results.read_text() if results.exists() else "# Measured results\n\n"
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))
    tmp.replace(results)
