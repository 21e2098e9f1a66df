"""Processes a test started through Ray, found by their process title."""

from __future__ import annotations

import psutil


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes of this test's Ray instance (started by this process, so its
    descendants; their process title names the actor class)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in p.cmdline()):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids
