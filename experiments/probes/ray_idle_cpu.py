"""Which of Ray's own processes take CPU on an idle local instance: start Ray the way ``excb`` does
(:func:`excb.run.startup.init_ray`), let it settle, then sum each process's CPU time (user + system, psutil) over
``--seconds`` seconds, by process kind (gcs_server, raylet, dashboard and its modules, log monitor, idle workers,
...). Run once per setting to compare (settings by environment, e.g. Ray's metrics off):

    flock /tmp/excb-ray.lock .venv/bin/python experiments/probes/ray_idle_cpu.py
    RAY_enable_metrics_collection=0 flock /tmp/excb-ray.lock .venv/bin/python experiments/probes/ray_idle_cpu.py
    flock /tmp/excb-ray.lock .venv/bin/python experiments/probes/ray_idle_cpu.py --no-dashboard

Prints one JSON object: CPU-seconds per minute of wall time by kind, and their sum (100 = one core busy all the
time would be 60 CPU-s/min).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def kind(cmdline: list[str]) -> str:
    """A short name for a Ray process from its command line."""
    text = " ".join(cmdline)
    for pattern, name in (("gcs_server", "gcs_server"), ("raylet", "raylet"),
                          ("dashboard/agent.py", "dashboard agent"), ("runtime_env/agent", "runtime-env agent"),
                          ("dashboard/dashboard.py", "dashboard"), ("log_monitor", "log monitor"),
                          ("monitor.py", "autoscaler monitor"), ("ray_client_server", "client server"),
                          ("default_worker", "idle worker"), ("ray::", "worker")):
        if pattern in text:
            return name
    return re.sub(r"\s.*", "", os.path.basename(cmdline[0])) if cmdline else "?"


def ray_processes(psutil, me: int) -> list:  # type: ignore[no-untyped-def]
    out = []
    for p in psutil.process_iter():
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        text = " ".join(cmd)
        if p.pid != me and ("ray" in text and ("site-packages/ray" in text or text.startswith("ray::"))):
            out.append(p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=15.0, help="seconds to wait after start-up before measuring")
    ap.add_argument("--no-dashboard", action="store_true", help="ray.init(include_dashboard=False) instead of "
                    "excb's init_ray (Ray Train's state tracking then cannot query the State API)")
    args = ap.parse_args()
    import psutil
    import ray

    from excb.run.startup import init_ray

    if args.no_dashboard:
        ray.init(num_cpus=2, include_dashboard=False)
    else:
        init_ray(num_cpus=2)
    time.sleep(args.settle)
    me = os.getpid()
    procs = ray_processes(psutil, me)
    before = {}
    for p in procs:
        try:
            t = p.cpu_times()
            before[p.pid] = (p, kind(p.cmdline()), t.user + t.system)
        except psutil.Error:
            continue
    t0 = time.time()
    time.sleep(args.seconds)
    wall = time.time() - t0
    per_kind: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for p, name, start in before.values():
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        per_kind[name] += (t.user + t.system - start) * 60.0 / wall
        counts[name] += 1
    ray.shutdown()
    setting = {"dashboard": not args.no_dashboard,
               "metrics_collection": os.environ.get("RAY_enable_metrics_collection", "1") != "0"}
    result = {**setting, "seconds": round(wall, 1),
              "cpu_seconds_per_minute": {k: round(v, 2) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
              "processes": dict(counts), "total": round(sum(per_kind.values()), 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
