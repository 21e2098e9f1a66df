"""Large-data rehearsal on this machine with real components (issue 12, item 6).

Full scale (the defaults: 50,000 training images, 6 epochs of 40 steps; about 30-35 min on this 2-core machine
the first time, ~4 min less when the dataset is reused from ``--work-dir``):

    flock /tmp/excb-ray.lock .venv/bin/python experiments/rehearsal_large_data.py

Small scale, to try it (~10 min; results kept out of RESULTS.md):

    flock /tmp/excb-ray.lock .venv/bin/python experiments/rehearsal_large_data.py --images 1500 --val-images 200 \
        --tar-size 250 --epochs 4 --kill-epoch 1 --max-steps-per-epoch 16 --checkpoint-every-steps 4 \
        --results /tmp/RESULTS.md --json /tmp/rehearsal.json

Only one Ray instance may run on this machine at a time: keep the ``flock``. Extra ``section.key=value`` arguments
go to the config. Exit status 0 when everything passed, 1 when the results list problems.

What it does, in order (every phase is timed; whatever fails is written into the results, not hidden):

1. **Data.** Builds (or reuses, from ``--work-dir``) a deterministic ImageNet-layout JPEG dataset: ``--images``
   training images and ``--val-images`` validation images, Fashion-MNIST items composited on coloured canvases of
   160-400 px with aspect ratios from 3:4 to 16:9, JPEG quality 85 (the exact recipe and seeding are in
   ``experiments/rehearsal_kit.py``), as an image folder (``train/<class>/*.jpg``, ``val/<class>/*.jpg``) and as
   WebDataset tars (``train/*.tar``, ``val/*.tar``), with 2 processes.
2. **Object storage.** Starts a real ``moto_server`` subprocess (S3 API; its PID is recorded and it is stopped by
   that PID at the end) and uploads both layouts to one bucket with boto3 (``--upload-threads`` parallel PUTs):
   ``s3://BUCKET/folder/...`` and ``s3://BUCKET/wds/...``.
3. **Cluster.** A simulated 2-node Ray cluster (``ray.cluster_utils.Cluster``, unique temp dir ``/tmp/rh-XXXXXX``,
   removed at the end unless something went wrong or ``--keep-ray-temp``): a head with 2 logical CPUs and a worker
   node with 1, each with one ``excb_slot`` resource (one training worker per node) and ``--object-store-mb`` of
   object store. Training workers take 0.5 CPU and 1 torch thread each, so the two of them and Ray Data's decode
   tasks (1 CPU each) fit on this 2-core machine.
4. **Training.** ``run_pretraining`` (the code path of ``excb pretrain`` joining a cluster through ``RAY_ADDRESS``,
   in a thread of this process, which is the driver) of a ResNet-18 (``torchvision:resnet18``) at
   ``--global-size`` / ``--local-size`` px crops from 96 px canvases, streamed from ``s3://``
   (``data.materialize=false``, decoded in Ray Data tasks every epoch), elastic ``train.num_workers=[1,2]`` with
   ``train.max_failures=-1``, mid-epoch checkpoints every ``--checkpoint-every-steps`` steps,
   ``train.record_sample_ids=true``, run directory on the same bucket (``--run-storage s3``, default) or under
   ``--work-dir`` (``local``). Each epoch is capped at ``--max-steps-per-epoch`` steps so the rehearsal fits
   ~30-45 min of this machine (an epoch is then a part of a pass; the sample-id audit knows it). Before the run,
   3 synthetic steps of the config (1 thread, no Ray, a child process) calibrate the printed plan.
5. **Faults** (from the main thread while training runs): in epoch ``--kill-epoch``, once a mid-epoch checkpoint
   of it exists and a few more steps have run, SIGKILL of the Ray Train worker on the head node; once the run
   has resumed, finished that epoch and written a mid-epoch checkpoint in the next one, removal of the worker
   node (``Cluster.remove_node(allow_graceful=False)``: the run continues on 1 worker); once the 1-worker group
   has written a checkpoint, a new worker node is added (Ray Train grows back to 2 at its next resize check).
   A watchdog gives up when neither a step nor a checkpoint came for ``--stall-timeout`` seconds (reported).
6. **Measurements**, sampled every ``--sample-every`` seconds (``samples.jsonl`` in the log folder): peak resident
   memory (psutil RSS) of the driver (this process) and of every process below it (Ray's, moto_server), a Ray
   worker with its own children; shared object-store pages count in RSS, so per-process peaks are given and sums
   over-count them. The object store's spilled and restored bytes (raylet node stats, per node, cumulative) and
   the spill files' size. Local disk: the Ray temp dir (logs, spill) + this run's checkpoint staging folder
   (``<temp>/excb-staging/<hash>``) + the trackers' staging folders of this run's processes
   (``<staging root>/track-<pid>-*``) + the run dir when local. From ``RUN/metrics.jsonl``: images/s and data-wait
   share per epoch, and a cross-check of each epoch's mean loss against its step lines. Resume times (below),
   split into their parts with Ray Train's controller log. The sample-id audit
   (``rehearsal_kit.audit_sample_ids``). Leftovers at the end: staging folders, the skip list, checkpoints beyond
   ``train.checkpoints_to_keep``, Ray processes.

Resume time, defined: for each fault, from the fault (the SIGKILL / the node removal / the node addition) to
  (a) *processes up*: the new Ray Train worker processes are running (psutil; new PIDs, the expected count),
  (b) *first step*: the first training-step progress line (``train.log_every_steps=1``: one per step, printed by
      rank 0 and forwarded to this console by Ray; received here within ~1 s) printed by the new group, and
  (c) *next checkpoint*: the next checkpoint directory complete in the run directory (``state.pt`` and
      ``state.json`` there).
  (b) is *the* resume time; "lost steps" are the steps the killed group trained after its last checkpoint.

7. **Results**: a JSON file (``--json``) and a Markdown section appended atomically (temp file + rename) to
   ``--results`` with the command line, the machine (CPU model, cores and RAM from /proc), and all numbers; the
   console, moto's log and the samples stay in ``--work-dir/rehearsal-<time>/``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ["RAY_DEDUP_LOGS"] = "0"  # read when Ray is imported: every worker line reaches this console as is
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rehearsal_kit as kit  # noqa: E402
from benchlib import append_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "excb-rehearsal"
PROTOTYPES = 256  # k-means seeds them from the first pass: at least this many images must be in it
SLOT = {"excb_slot": 1}
PROGRESS = re.compile(r"epoch (\d+)(?:/\d+)? step (\d+)/(\d+)(?:\D+?loss ([-0-9.naif]+))?")
MIB = 2**20


# ------------------------------------------------------------------------------------------------ console tee

class Tee(io.TextIOBase):
    """This process's stdout/stderr, copied to a log file; complete lines are handed to ``on_line`` with the time
    they arrived (Ray forwards worker output to the driver's ``sys.stdout`` / ``sys.stderr``)."""

    def __init__(self, stream: Any, log: Any, on_line: Any) -> None:
        self.stream, self.log, self.on_line = stream, log, on_line
        self.buf = ""
        self.lock = threading.Lock()

    def write(self, s: str) -> int:
        with self.lock:
            self.stream.write(s)
            self.log.write(s)
            self.buf += s
            *lines, self.buf = self.buf.split("\n")
        for line in lines:
            self.on_line(time.time(), line)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


class Console:
    """What the console said that the measurements need: step lines, resume lines, errors."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int, int, int]] = []  # (time, epoch, step, steps per epoch)
        self.losses: list[tuple[int, int, float]] = []  # (epoch, step, rank 0's loss)
        self.resumed: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def on_line(self, t: float, line: str) -> None:
        m = PROGRESS.search(line)
        with self.lock:
            if m and "[excb]" in line:
                self.steps.append((t, int(m.group(1)), int(m.group(2)), int(m.group(3))))
                try:
                    self.losses.append((int(m.group(1)), int(m.group(2)), float(m.group(4))))
                except (TypeError, ValueError):
                    pass
            elif "resumed from" in line:
                self.resumed.append((t, line.strip()[-300:]))
            elif re.search(r"Traceback|Error|error:|FAILED|WARNING.*(fail|retry)", line):
                if len(self.errors) < 200:
                    self.errors.append((t, line.strip()[:500]))

    def last_step(self) -> tuple[float, int, int, int] | None:
        with self.lock:
            return self.steps[-1] if self.steps else None

    def steps_after(self, t: float) -> list[tuple[float, int, int, int]]:
        with self.lock:
            return [s for s in self.steps if s[0] > t]


def log(msg: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ the machine

def machine() -> dict[str, Any]:
    cpu, mem_kib = "unknown", 0
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                           if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    import PIL
    import ray
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "pillow": PIL.__version__, "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


# ------------------------------------------------------------------------------------------------ the config

def overrides(args: argparse.Namespace, data_uri: str, endpoint: str, rows: int) -> list[str]:
    return [
        "data.dataset=rehearsal", f"data.path={data_uri}", f"data.format={args.format}", "data.materialize=false",
        f"data.train_rows={rows if args.format == 'webdataset' else 0}",  # an image folder is counted by listing
        "data.channels=3", f"data.image_size={args.image_size}",
        "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",
        f"model.backbone={args.backbone}", "model.projector_hidden=512", "model.predictor_hidden=512",
        f"model.num_prototypes={PROTOTYPES}",
        f"augment.global_size={args.global_size}", f"augment.local_size={args.local_size}",
        f"augment.num_local={args.num_local}",
        "method.kmeans_samples=512", "method.kmeans_iters=10",
        f"optim.lr={args.lr}", "optim.warmup_epochs=1",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.num_workers=[1,2]",
        "train.cpus_per_worker=0.5", "train.worker_resources={excb_slot: 1}",
        f"train.elastic_resize_interval_s={args.resize_interval}", "train.torch_threads=1",
        "train.max_failures=-1", "train.record_sample_ids=true",
        f"train.checkpoint_every_steps={args.checkpoint_every_steps}", "train.checkpoints_to_keep=2",
        "train.log_every_steps=1", f"train.max_steps_per_epoch={args.max_steps_per_epoch}",
        "eval.epoch_knn_train=0", "eval.final_eval=false",
        f"storage.endpoint_url={endpoint}",
        *args.overrides,
    ]


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """The training step of this config (one worker's batch, 1 thread, synthetic images, no Ray) in a child
    process, so the driver's memory is not touched: seconds per step, for the plan."""
    per_worker = args.batch_size // 2
    ov = overrides(args, "/nonexistent", "", args.images)
    ov = [o for o in ov if not o.startswith(("train.num_workers", "train.batch_size", "train.worker_resources",
                                             "storage.endpoint_url"))]
    ov += ["train.num_workers=1", f"train.batch_size={per_worker}"]
    code = ("import json,sys,torch\n"
            "from excb.config import load_config\n"
            "from excb.run.bench import measure_synthetic\n"
            "torch.set_num_threads(1)\n"
            "cfg = load_config(None, json.loads(sys.argv[1]))\n"
            "r = measure_synthetic(cfg, torch.device('cpu'), 3, 1)\n"
            "print('CALIB ' + json.dumps({'ms_per_step': r['ms_per_step'], 'batch': r['batch'],"
            " 'images_per_second': r['images_per_second']}))\n")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(ov)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("CALIB ")), None)
    if line is None:
        return {"error": (out.stdout + out.stderr)[-2000:]}
    return {**json.loads(line[6:]), "seconds": time.time() - t0, "load_average": os.getloadavg()}


# Constants of the plan's estimate, measured here in small rehearsals (1,500 images, 2026-12-02): a step of the
# 2-worker group took 1.6× the 1-thread synthetic step (2 workers + Ray Data decoding + Ray's own processes on 2
# cores, gloo all-reduce); a checkpoint on the bucket ~6 s; a pass's first batch ~15 s (image folder; ~3 s tars);
# a restart ~120 s (worker group start, the checkpoint read, the first batch; ~60 s more after a node loss).
# The upload ran at ~210 small objects/s into moto_server with 16 threads.
STEP_FACTOR, CKPT_S, PASS_START_S, RESTART_S, STARTUP_S = 1.6, 6.0, 15.0, 120.0, 90.0
UPLOAD_OBJECTS_PER_S = 200.0


def plan(args: argparse.Namespace, calib: dict[str, Any]) -> dict[str, Any]:
    """Steps, images and an estimate of the training time from the calibrated step (see the constants above)."""
    gb = args.batch_size
    spe = min(args.images // gb, args.max_steps_per_epoch or 10**9)
    ckpts = args.epochs * (1 + (spe - 1) // args.checkpoint_every_steps)
    restarts = 0 if args.no_faults else 3
    step_s = calib.get("ms_per_step", float("nan")) / 1000 * STEP_FACTOR
    train_s = (args.epochs * spe * step_s + ckpts * CKPT_S + (args.epochs + restarts) * PASS_START_S
               + restarts * RESTART_S + STARTUP_S)
    upload_s = (args.images + args.val_images) / UPLOAD_OBJECTS_PER_S
    return {"steps_per_epoch_at_2": spe, "images_per_epoch_at_2": spe * gb,
            "share_of_a_pass": spe * gb / args.images, "checkpoints": ckpts,
            "estimated_step_seconds": step_s, "estimated_training_seconds": train_s,
            "estimated_upload_seconds": upload_s}


# ------------------------------------------------------------------------------------------------ the rehearsal

class Stalled(RuntimeError):
    pass


class Rehearsal:
    def __init__(self, args: argparse.Namespace, console: Console, out_dir: Path) -> None:
        self.args, self.console, self.out_dir = args, console, out_dir
        self.events: list[dict[str, Any]] = []
        self.faults: dict[str, Any] = {}
        self.problems: list[str] = []
        self.result: dict[str, Any] = {}
        self.stop = threading.Event()
        self.samples_file = open(out_dir / "samples.jsonl", "a")
        self.disk_peak: dict[str, int] = {}
        self.spill: dict[str, dict[str, int]] = {}
        self.store_used_peak = 0
        self.last_progress = time.time()
        self.known_ckpts: set[str] = set()

    # -------------------------------------------------------------------------------------- observation
    def event(self, what: str, **kw: Any) -> dict[str, Any]:
        e = {"t": time.time(), "t_rel": round(time.time() - self.t_fit, 1), "event": what, **kw}
        self.events.append(e)
        log(f"EVENT {what} {json.dumps({k: v for k, v in kw.items()}, default=str)}")
        return e

    def checkpoint_dirs(self) -> tuple[list[str], list[str]]:
        """Names of the run's checkpoint directories: (complete: ``state.pt`` and ``state.json`` there, partial:
        anything else), oldest first."""
        import pyarrow.fs as pafs

        from excb.storage import resolve_fs

        fs, path = resolve_fs(self.run_dir)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError:
            return [], []
        files: dict[str, set[str]] = {}
        for i in infos:
            parts = i.path[len(path) + 1:].split("/")
            if parts[0].startswith("checkpoint_epoch"):
                files.setdefault(parts[0], set())
                if len(parts) == 2 and i.type == pafs.FileType.File:
                    files[parts[0]].add(parts[1])
        complete = sorted(n for n, f in files.items() if {"state.pt", "state.json"} <= f)
        return complete, sorted(set(files) - set(complete))

    def checkpoints(self) -> list[str]:
        """Complete checkpoint directories of the run (names), oldest first."""
        names = self.checkpoint_dirs()[0]
        new = set(names) - self.known_ckpts
        if new:
            self.last_progress = time.time()
            self.known_ckpts |= new
        return names

    def metrics(self) -> list[dict[str, Any]]:
        from excb.rundir.runfiles import read_metrics

        try:
            return read_metrics(self.run_dir)
        except Exception:  # noqa: BLE001 - mid-write or not there yet
            return []

    def alive(self) -> bool:
        return self.run_thread.is_alive()

    def check(self) -> None:
        """Raise Stalled when neither a step line nor a checkpoint came for ``--stall-timeout`` seconds."""
        last = self.console.last_step()
        if last is not None:
            self.last_progress = max(self.last_progress, last[0])
        if time.time() - self.last_progress > self.args.stall_timeout:
            raise Stalled(f"no training step and no new checkpoint for {self.args.stall_timeout:.0f}s")

    def wait(self, what: str, predicate: Any, poll: float = 1.0) -> Any:
        """Poll ``predicate`` until it returns something truthy; None when the run ended first."""
        while self.alive():
            self.check()
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        self.problems.append(f"the run ended before: {what}")
        log(f"the run ended before: {what}")
        return None

    def node_of(self, pid: int) -> str:
        import psutil
        from ray._private import ray_constants

        try:
            parent = psutil.Process(pid).ppid()
        except psutil.Error:
            return "?"
        nodes = [("head", self.cluster.head_node)] + [(f"worker-{i}", n) for i, n in
                                                     enumerate(self.cluster.worker_nodes)]
        for name, node in nodes:
            for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
                if info.process.pid == parent:
                    return name
        return "?"

    # -------------------------------------------------------------------------------------- sampling
    def sampler_loop(self) -> None:
        import ray
        from ray._private import internal_api

        from excb.rundir.checkpoint import staging_root

        staging = staging_root(self.run_dir)
        while not self.stop.is_set():
            try:
                s = self.procs.sample()
                temp_total = spilled_files = 0
                for dirpath, _d, files in os.walk(self.ray_temp, onerror=lambda e: None):
                    for f in files:
                        try:
                            b = os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                        except OSError:
                            continue
                        temp_total += b
                        if "spill" in dirpath:
                            spilled_files += b
                disk = {"ray_temp": temp_total, "spill_files": spilled_files, "staging": kit.dir_bytes(staging),
                        "tracking_staging": sum(kit.dir_bytes(f) for f in self.tracking_folders()),
                        "run_dir": kit.dir_bytes(self.run_dir) if "://" not in self.run_dir else 0,
                        "excb_staging_all_runs": kit.dir_bytes(os.path.dirname(staging))}
                disk["total"] = disk["ray_temp"] + disk["staging"] + disk["tracking_staging"] + disk["run_dir"]
                for k, v in disk.items():
                    self.disk_peak[k] = max(self.disk_peak.get(k, 0), v)
                used = 0
                if ray.is_initialized():
                    for node in ray.nodes():
                        if not node.get("Alive"):
                            continue
                        try:
                            st = internal_api.node_stats(node["NodeManagerAddress"], node["NodeManagerPort"],
                                                         include_memory_info=False).store_stats
                        except Exception:  # noqa: BLE001 - a node going away
                            continue
                        rec = self.spill.setdefault(node["NodeID"][:12], {})
                        for key in ("spilled_bytes_total", "spilled_objects_total", "restored_bytes_total",
                                    "object_store_bytes_used", "object_store_bytes_fallback"):
                            rec[key] = max(rec.get(key, 0), int(getattr(st, key, 0)))
                        used += int(st.object_store_bytes_used)
                self.store_used_peak = max(self.store_used_peak, used)
                s.update(disk=disk, object_store_used=used)
                self.samples_file.write(json.dumps(s) + "\n")
                self.samples_file.flush()
            except Exception as e:  # noqa: BLE001 - sampling must not stop the rehearsal
                self.problems.append(f"sampler: {type(e).__name__}: {e}")
            self.stop.wait(self.args.sample_every)

    def tracking_folders(self) -> list[str]:
        """The experiment trackers' local staging folders (``<temp>/excb-track-<pid>-*``) of this run's
        processes (every process seen below this one)."""
        import glob

        from excb.rundir.checkpoint import staging_root

        pids = set(self.procs.per_pid) | {os.getpid()}
        out = []
        # under the run's staging root since the first full rehearsal; in the temp folder before
        for pattern, prefix in ((os.path.join(staging_root(self.run_dir), "track-*-*"), "track-"),
                                (os.path.join(tempfile.gettempdir(), "excb-track-*-*"), "excb-track-")):
            for f in glob.glob(pattern):
                try:
                    if int(os.path.basename(f)[len(prefix):].split("-", 1)[0]) in pids:
                        out.append(f)
                except ValueError:
                    continue
        return out

    # -------------------------------------------------------------------------------------- faults
    def _group(self, exclude: set[int], count: int) -> list[int] | None:
        pids = self.procs.train_worker_pids()
        fresh = [p for p in pids if p not in exclude]
        return fresh if len(fresh) == count and len(pids) == count else None

    def _after_fault(self, rec: dict[str, Any], before_pids: set[int], before_ckpts: set[str], count: int) -> None:
        """Fill ``rec`` with the times from the fault to the group being up, its first step and the next
        checkpoint (see the module docstring)."""
        t0 = rec["t"]
        group = self.wait(f"{rec['event']}: a new group of {count} training worker(s)",
                          lambda: self._group(before_pids, count), poll=0.25)
        if group is None:
            return
        rec["group_up_s"] = round(time.time() - t0, 1)
        rec["new_pids"] = group
        t_up = time.time()
        first = self.wait(f"{rec['event']}: the new group's first step", lambda: self.console.steps_after(t_up),
                          poll=0.25)
        if first:
            rec["first_step_s"] = round(first[0][0] - t0, 1)
            rec["first_step"] = {"epoch": first[0][1], "step": first[0][2], "steps_per_epoch": first[0][3]}
        resumed = [r for r in self.console.resumed if r[0] > t0]
        if resumed:
            rec["resumed_line_s"] = round(resumed[0][0] - t0, 1)
            rec["resumed_line"] = resumed[0][1]
        nxt = self.wait(f"{rec['event']}: the next checkpoint",
                        lambda: [n for n in self.checkpoints() if n not in before_ckpts], poll=0.5)
        if nxt:
            rec["next_checkpoint_s"] = round(time.time() - t0, 1)
            rec["next_checkpoint"] = nxt[0]

    def _mid_ckpt(self, epoch_done: int) -> str | None:
        """The newest complete mid-epoch checkpoint inside epoch ``epoch_done + 1``."""
        names = [n for n in self.checkpoints() if n.startswith(f"checkpoint_epoch{epoch_done:04d}_img")]
        return names[-1] if names else None

    def _ckpt_step_in_epoch(self, name: str) -> int:
        images = int(name.rsplit("_img", 1)[1]) if "_img" in name else 0
        return images // self.args.batch_size

    def _settle(self, epoch: int, ckpt_step: int) -> None:
        """Let the group train a few steps past its checkpoint (so the fault lands between checkpoints)."""
        lag = max(1, self.args.checkpoint_every_steps // 2)

        def past() -> bool:
            last = self.console.last_step()
            return last is not None and (last[1] > epoch or (last[1] == epoch and last[2] >= ckpt_step + lag))

        self.wait(f"step {ckpt_step + lag} of epoch {epoch}", past, poll=0.25)

    def _lost_steps(self, rec: dict[str, Any], last: Any, ckpts: set[str], epoch: int) -> None:
        """Steps the group trained after its newest checkpoint (lost with it), from the last step line seen."""
        mid = sorted(n for n in ckpts if n.startswith(f"checkpoint_epoch{epoch - 1:04d}_img"))
        if last is not None and last[1] == epoch:
            rec["lost_steps"] = last[2] - (self._ckpt_step_in_epoch(mid[-1]) if mid else 0)

    def inject(self) -> None:
        a = self.args
        e_kill = a.kill_epoch
        # 1. SIGKILL of a training worker, inside epoch e_kill, after a mid-epoch checkpoint of it
        ck = self.wait(f"a mid-epoch checkpoint in epoch {e_kill}", lambda: self._mid_ckpt(e_kill - 1))
        if ck is None:
            return
        self._settle(e_kill, self._ckpt_step_in_epoch(ck))
        if not self.alive():
            return
        pids = self.procs.train_worker_pids()
        head = [p for p in pids if self.node_of(p) == "head"]
        victim = (head or pids)[-1]
        before_ckpts = set(self.checkpoints())
        last = self.console.last_step()
        node = self.node_of(victim)
        os.kill(victim, signal.SIGKILL)
        rec = self.event("sigkill_train_worker", pid=victim, node=node, workers_before=pids,
                         newest_checkpoint=max(before_ckpts) if before_ckpts else None,
                         last_step_seen=None if last is None else {"epoch": last[1], "step": last[2]})
        self._lost_steps(rec, last, before_ckpts, e_kill)
        self.faults["sigkill"] = rec
        self._after_fault(rec, set(pids), before_ckpts, 2)

        # 2. remove the worker node, inside epoch e_kill + 1, after a mid-epoch checkpoint of it
        e_rm = e_kill + 1
        ck = self.wait(f"a mid-epoch checkpoint in epoch {e_rm}", lambda: self._mid_ckpt(e_rm - 1))
        if ck is None:
            return
        self._settle(e_rm, self._ckpt_step_in_epoch(ck))
        if not self.alive():
            return
        (worker_node,) = self.cluster.worker_nodes
        pids = self.procs.train_worker_pids()
        before_ckpts = set(self.checkpoints())
        last = self.console.last_step()
        self.cluster.remove_node(worker_node, allow_graceful=False)
        rec = self.event("remove_worker_node", workers_before=pids,
                         newest_checkpoint=max(before_ckpts) if before_ckpts else None,
                         last_step_seen=None if last is None else {"epoch": last[1], "step": last[2]})
        self._lost_steps(rec, last, before_ckpts, e_rm)
        self.faults["remove_node"] = rec
        self._after_fault(rec, set(pids), before_ckpts, 1)
        one = set(rec.get("new_pids") or [])
        # the 1-worker group writes a checkpoint of its own before the node comes back
        self.wait("a checkpoint written by the 1-worker group",
                  lambda: [n for n in self.checkpoints() if n not in before_ckpts])
        if not self.alive():
            return

        # 3. add a worker node back; Ray Train grows the group at its next resize check
        before_ckpts = set(self.checkpoints())
        self.cluster.add_node(num_cpus=1, resources=SLOT, object_store_memory=a.object_store_mb * MIB)
        rec = self.event("add_worker_node", workers_before=sorted(one),
                         newest_checkpoint=max(before_ckpts) if before_ckpts else None)
        self.faults["add_node"] = rec
        self._after_fault(rec, one, before_ckpts, 2)

    # -------------------------------------------------------------------------------------- the run
    def run(self, cfg: Any, storage_path: str, name: str) -> None:
        import ray
        from ray.cluster_utils import Cluster

        from excb.run.pretrain import run_pretraining
        from excb.storage import join

        a = self.args
        self.run_dir = join(storage_path, name)
        self.ray_temp = f"/tmp/rh-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
        t0 = time.time()
        # Cluster() writes the head's address into Ray's default temp folder (/tmp/ray/ray_current_cluster) whatever
        # temp_dir says, and fails on a machine where no Ray ever ran; its shutdown removes the file again.
        from ray._common.utils import get_default_ray_temp_dir

        os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": SLOT, "object_store_memory": a.object_store_mb * MIB,
            "temp_dir": self.ray_temp,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
        self.cluster.add_node(num_cpus=1, resources=SLOT, object_store_memory=a.object_store_mb * MIB)
        os.environ["RAY_ADDRESS"] = self.cluster.address
        try:
            from excb.run.startup import init_ray

            init_ray()  # as `excb pretrain` joins a cluster (quiet workers), here in the main thread
        except Exception as e:  # noqa: BLE001 - fall back to a plain connection
            self.problems.append(f"excb.run.startup.init_ray failed ({e}); joined with ray.init")
            ray.init(address=self.cluster.address)
        self.result["cluster_start_seconds"] = time.time() - t0
        self.result["ray_temp_dir"] = self.ray_temp
        self.procs = kit.ProcessSampler()
        self.t_fit = time.time()
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["summary"] = run_pretraining(cfg, storage_path, name)
            except BaseException as e:  # noqa: BLE001 - reported
                outcome["error"] = "".join(traceback.format_exception(e))

        self.run_thread = threading.Thread(target=target, daemon=True, name="run_pretraining")
        sampler = threading.Thread(target=self.sampler_loop, daemon=True, name="sampler")
        sampler.start()
        self.run_thread.start()
        stalled = None
        try:
            if not a.no_faults:
                self.inject()
            while self.alive():
                self.check()
                self.checkpoints()
                time.sleep(1.0)
        except Stalled as e:
            stalled = str(e)
            self.problems.append(f"STALLED: {e}")
            self.event("stalled", reason=str(e))
        except KeyboardInterrupt:
            stalled = "interrupted"
            self.problems.append("INTERRUPTED (Ctrl-C) during the run")
            self.event("interrupted")
        except Exception as e:  # noqa: BLE001 - a failure of the rehearsal itself, reported
            self.problems.append(f"rehearsal error: {''.join(traceback.format_exception(e))}")
            self.event("rehearsal_error", error=repr(e))
        self.result["fit_wall_seconds"] = time.time() - self.t_fit
        if stalled:
            log("stalled run: shutting down the cluster; waiting 120 s for the driver thread")
        t_down = 0.0
        try:
            self.run_thread.join(timeout=None if not stalled else 1)
            self.result["outcome"] = outcome
            if "error" in outcome:
                self.problems.append("run_pretraining raised:\n" + outcome["error"][-6000:])
            self.stop.set()
            sampler.join(timeout=30)
            self.procs.sample()
            self.collect(cfg)
        finally:
            self.stop.set()
            t_down = time.time()
            try:
                ray.shutdown()
            finally:
                self.cluster.shutdown()
        self.result["cluster_shutdown_seconds"] = time.time() - t_down
        if stalled:
            self.run_thread.join(timeout=120)
            self.result["driver_thread_alive_after_shutdown"] = self.run_thread.is_alive()
        leftovers = []
        for p in self.procs.me.children(recursive=True):
            try:
                if kit.classify(p.cmdline()) in ("train_worker", "ray_worker", "ray_system"):
                    leftovers.append(p.pid)
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
        if leftovers:
            self.problems.append(f"Ray processes left after shutdown: {leftovers}")
        self.samples_file.close()
        if self.problems or a.keep_ray_temp:
            self.result["ray_temp_kept"] = True  # Ray's logs, for whoever looks into the problems
        else:
            import shutil

            shutil.rmtree(self.ray_temp, ignore_errors=True)

    def restart_breakdown(self) -> None:
        """From Ray Train's controller log: when, after each fault, it decided to (re)start a worker group and
        when that group's training function was launched; with the "resumed from" line (checkpoint loaded) and
        the first step, that splits each resume time into its parts."""
        import glob

        entries = []
        files = {os.path.realpath(f) for f in glob.glob(os.path.join(self.ray_temp, "session_*", "logs", "train",
                                                                     "ray-train-sys-controller-*.log"))}
        for f in sorted(files):  # session_latest links to the session: each file once
            with open(f, errors="replace") as fh:
                for line in fh:
                    try:
                        d = json.loads(line)
                        entries.append((d["timestamp_ns"] / 1e9, d.get("message", "")))
                    except (ValueError, KeyError):
                        continue
        entries.sort()
        for rec in self.faults.values():
            t0 = rec["t"]
            after = [(t, msg) for t, msg in entries if t > t0]
            decided = next((t for t, msg in after if msg.startswith("Attempting to start training worker group")),
                           None)
            started = next((t for t, msg in after if msg.startswith("Started training worker group")), None)
            failure = next((msg for _t, msg in after if "[FailurePolicy]" in msg), None)
            until = started if started is not None else float("inf")
            rec["controller"] = [f"+{t - t0:.1f}s {label}" for t, msg in after if t <= until
                                 for label in [controller_label(msg)] if label][:12]
            if decided is not None:
                rec["restart_decided_s"] = round(decided - t0, 1)
            if started is not None:
                rec["train_fn_launched_s"] = round(started - t0, 1)
            if failure:
                rec["failure_policy"] = failure[:300]
        if not entries:
            self.problems.append("Ray Train controller log not found: no restart breakdown")

    def check_epoch_means(self, history: list[dict[str, Any]]) -> None:
        """A heuristic cross-check of metrics.jsonl: an epoch's mean loss against the mean of the step lines of
        that epoch (rank 0's losses, the newest line per step number); more than 15 % apart is reported."""
        by_epoch: dict[int, dict[int, float]] = {}
        for epoch, step, loss in self.console.losses:
            by_epoch.setdefault(epoch, {})[step] = loss
        checks = []
        for r in history:
            steps = by_epoch.get(r["epoch"])
            if not steps or "loss" not in r:
                continue
            lines = sum(steps.values()) / len(steps)
            checks.append({"epoch": r["epoch"], "metrics_loss": r["loss"], "step_lines_loss": lines,
                           "step_lines": len(steps)})
            if abs(r["loss"] - lines) > 0.15 * abs(lines):
                self.problems.append(f"epoch {r['epoch']}: metrics.jsonl loss {r['loss']:.4f} but its step lines "
                                     f"average {lines:.4f} ({len(steps)} steps; resumed at image "
                                     f"{r.get('resumed_at_images', 0)}, {r.get('workers')} worker(s) at its end)")
        self.result["epoch_loss_check"] = checks

    def collect(self, cfg: Any) -> None:
        from excb.rundir.checkpoint import staging_root
        from excb.storage import exists, join

        history = self.metrics()
        self.result["history"] = history
        self.result["checkpoints_at_end"], partial = self.checkpoint_dirs()
        self.result["partial_checkpoints_at_end"] = partial
        if partial:
            self.problems.append(f"partial checkpoint directories left in the run directory (not state.pt + "
                                 f"state.json): {partial}")
        keep = cfg.train.checkpoints_to_keep
        if len(self.result["checkpoints_at_end"]) > keep:
            self.problems.append(f"{len(self.result['checkpoints_at_end'])} checkpoints left, "
                                 f"train.checkpoints_to_keep={keep}: {self.result['checkpoints_at_end']}")
        staging = Path(staging_root(self.run_dir))
        left = sorted(str(p) for p in staging.iterdir()) if staging.exists() else []
        self.result["staging_left"] = left
        if left:
            self.problems.append(f"staging folders left: {left}")
        tracking_left = self.tracking_folders()
        self.result["tracking_staging_left"] = tracking_left
        if tracking_left:
            self.problems.append(f"tracker staging folders left by this run's processes: {tracking_left}")
        skip = exists(join(self.run_dir, "resume", "skip_ids.npy"))
        self.result["skip_list_left"] = skip
        if skip:
            self.problems.append("RUN/resume/skip_ids.npy left after the run")
        rows = self.train_rows
        try:
            self.result["audit"] = kit.audit_sample_ids(self.run_dir, history, rows)
        except Exception as e:  # noqa: BLE001 - reported
            self.result["audit"] = {"ok": False, "problems": [f"audit failed: {''.join(traceback.format_exception(e))}"]}
        if not self.result["audit"]["ok"]:
            self.problems.append("sample-id audit failed: " + "; ".join(self.result["audit"]["problems"][:10]))
        self.restart_breakdown()
        self.check_epoch_means(history)
        self.result["memory"] = self.procs.report()
        self.result["disk_peak"] = self.disk_peak
        self.result["spill_per_node"] = self.spill
        self.result["object_store_used_peak"] = self.store_used_peak
        self.result["events"] = self.events
        self.result["faults"] = self.faults
        self.result["console_errors"] = self.console.errors[:50]
        self.result["steps_logged"] = len(self.console.steps)
        expected = {"sigkill", "remove_node", "add_node"} if not self.args.no_faults else set()
        missing = expected - set(self.faults)
        if missing:
            self.problems.append(f"faults not injected: {sorted(missing)}")
        for name, rec in self.faults.items():
            if "first_step_s" not in rec:
                self.problems.append(f"{name}: training did not resume with a new group")
        if history:
            epochs = [r["epoch"] for r in history]
            if epochs != list(range(1, cfg.train.epochs + 1)):
                self.problems.append(f"epochs in metrics.jsonl: {epochs}, expected 1..{cfg.train.epochs}")


def controller_label(msg: str) -> str | None:
    """A short label for the Ray Train controller messages that tell a restart's story (None for the rest)."""
    m = re.match(r"Attempting to start training worker group of size (\d+)", msg)
    if m:
        return f"starts a group of {m.group(1)}"
    m = re.match(r"Started training worker group of size (\d+)", msg)
    if m:
        return f"group of {m.group(1)} running"
    m = re.search(r"resize the worker group from (\d+) -> (\d+)", msg)
    if m:
        return f"resize {m.group(1)} -> {m.group(2)}"
    m = re.search(r"startup timed out after ([0-9.]+) seconds waiting for (\d+) workers", msg)
    if m and "[FailurePolicy]" not in msg:
        return f"start of {m.group(2)} timed out after {float(m.group(1)):.0f} s"
    if msg.startswith("[FailurePolicy]"):
        return "failure policy: " + msg.split("\n", 1)[0].replace("[FailurePolicy] ", "")[:40]
    return None


# ------------------------------------------------------------------------------------------------ report

def fmt_b(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB"


def markdown(res: dict[str, Any]) -> list[str]:
    a, m, ds = res["args"], res["machine"], res.get("dataset", {})
    when = datetime.fromtimestamp(res["started"], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    verdict = "**passed**" if res["status"] == "passed" else f"**{res['status']}**"
    L = [f"### Large-data rehearsal (issue 12): {a['images']:,} JPEGs streamed from S3, simulated 2-node cluster, "
         f"faults — {when}", "",
         f"`{res['command']}`", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM (/proc); Python {m['python']}, "
         f"torch {m['torch']}, Ray {m['ray']}, Pillow {m['pillow']}; load average at start "
         f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}. Total wall time "
         f"{res.get('wall_seconds', 0) / 60:.1f} min. Result: {verdict}.", ""]
    if ds:
        tr, va = ds["splits"]["train"], ds["splits"]["val"]
        sz = ds.get("image_size_sample", {})
        L += [f"Data: {tr['images']:,} train + {va['images']:,} val JPEGs ({fmt_b(tr['jpeg_bytes'] + va['jpeg_bytes'])}; "
              f"sample of {sz.get('images')}: width {sz.get('width')}, height {sz.get('height')} px, aspect "
              f"{sz.get('aspect_w_over_h')}, {sz.get('jpeg_kib_mean')} KiB mean), and {tr['tars'] + va['tars']} "
              f"WebDataset tars ({fmt_b(tr['tar_bytes'] + va['tar_bytes'])}); "
              + (f"reused from {ds['root']}" if ds.get("reused") else
                 f"built in {ds['build_seconds']:.0f} s with 2 processes") + "."]
    up = res.get("upload", {})
    if up:
        L += [f"Upload to moto_server (PID {res.get('moto_pid')}), {a['upload_threads']} threads: "
              + "; ".join(f"{k}: {v['objects']:,} objects, {fmt_b(v['bytes'])} in {v['seconds']:.0f} s "
                          f"({v['objects_per_second']:.0f} objects/s, {v['mib_per_second']:.1f} MiB/s)"
                          for k, v in up.items()) + "."]
    p = res.get("plan", {})
    L += ["", f"Run: `{a['backbone']}`, {a['image_size']} px canvases, crops 2×{a['global_size']} + "
          f"{a['num_local']}×{a['local_size']}, global batch {a['batch_size']} at 2 workers (16 per worker, lr and "
          f"batch scaled with the group), {a['epochs']} epochs of at most {a['max_steps_per_epoch']} steps "
          f"({p.get('share_of_a_pass', 0):.1%} of a pass each), data.format={a['format']} streamed from s3:// "
          f"(data.materialize=false), checkpoints every {a['checkpoint_every_steps']} steps, run directory "
          f"{'on the bucket' if a['run_storage'] == 's3' else 'local'} (`{res.get('run_dir')}`); object store "
          f"{a['object_store_mb']} MiB per node. Plan: {p.get('estimated_training_seconds', 0) / 60:.0f} min of "
          f"training estimated from a {res.get('calibration', {}).get('ms_per_step', float('nan')):.0f} ms "
          f"synthetic step (1 thread, batch 16)."]
    hist = res.get("history", [])
    if hist:
        L += ["", "| epoch | workers | global batch | steps | seconds | images/s | data wait | first batch s | "
              "resumed at image | loss |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in hist:
            L.append(f"| {r['epoch']} | {r.get('workers')} | {r.get('global_batch')} | {r.get('steps_per_epoch')} | "
                     f"{r.get('epoch_seconds', 0):.0f} | {r.get('images_per_second', 0):.1f} | "
                     f"{100 * r.get('data_wait_fraction', 0):.1f} % | {r.get('first_batch_seconds', 0):.1f} | "
                     f"{r.get('resumed_at_images', '')} | {r.get('loss', float('nan')):.3f} |")
        s = res.get("totals", {})
        L += ["", f"Throughput over all epochs: {s.get('images_per_second', 0):.1f} images/s of epoch time "
              f"({s.get('images', 0):,} images in {s.get('epoch_seconds', 0):.0f} s), "
              f"{s.get('images_per_fit_second', 0):.1f} images/s of the whole fit "
              f"({res.get('fit_wall_seconds', 0):.0f} s, restarts included); data-wait share "
              f"{100 * s.get('data_wait_fraction', 0):.1f} % (time-weighted)."]
    f = res.get("faults", {})
    if f:
        L += ["", "| fault | at (s into fit) | where | new group decided | processes up | train fn launched | "
              "checkpoint loaded | first step (resume time) | next checkpoint | lost steps |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, rec in f.items():
            where = rec.get("node", "") if k == "sigkill" else ""
            ls = rec.get("last_step_seen") or {}
            where += f" epoch {ls.get('epoch')} step {ls.get('step')}" if ls else ""
            L.append(f"| {k} | {rec['t_rel']} | {where} | {rec.get('restart_decided_s', '–')} s | "
                     f"{rec.get('group_up_s', '–')} s | {rec.get('train_fn_launched_s', '–')} s | "
                     f"{rec.get('resumed_line_s', '–')} s | **{rec.get('first_step_s', '–')} s** | "
                     f"{rec.get('next_checkpoint_s', '–')} s | "
                     f"{rec.get('lost_steps') if rec.get('lost_steps') is not None else '–'} |")
        for k, rec in f.items():
            if rec.get("controller"):
                L.append(f"- {k}, Ray Train's controller: " + "; ".join(rec["controller"]))
        L += ["", "All times from the fault. Resume time = to the first training step of the new worker group (its "
              "progress line reaching the driver, ≤ ~1 s late). New group decided / train fn launched: Ray Train's "
              "controller log; processes up: the new worker processes seen by psutil; checkpoint loaded: the "
              "group's \"resumed from\" line (the checkpoint read from the run directory); next checkpoint: its "
              "first checkpoint complete in the run directory; lost steps: trained after the newest checkpoint "
              "before the fault."]
    mem = res.get("memory", {})
    if mem:
        tw = mem.get("train_workers", [])
        L += ["", f"Peak resident memory: driver {fmt_b(mem['driver_peak_rss'])}; Ray Train workers "
              + ", ".join(fmt_b(w["peak_rss"]) for w in tw) + f" ({len(tw)} processes over the run); largest "
              f"other Ray worker {fmt_b(mem['ray_worker']['max_peak_rss'])} ({mem['ray_worker']['processes']} "
              f"processes); Ray system processes together {fmt_b(mem['peak_total_rss_by_kind'].get('ray_system', 0))}; "
              f"all Ray processes together {fmt_b(mem['peak_total_rss_by_kind'].get('all_ray', 0))} (shared "
              f"object-store pages counted in each); moto_server {fmt_b(mem['s3_server']['max_peak_rss'])}; "
              f"machine in use at peak {fmt_b(mem['peak_machine_used'])}."]
    spill = res.get("spill_per_node", {})
    d = res.get("disk_peak", {})
    L += [f"Object store: peak in use {fmt_b(res.get('object_store_used_peak', 0))} (all nodes); spilled "
          f"{fmt_b(sum(v.get('spilled_bytes_total', 0) for v in spill.values()))} "
          f"({sum(v.get('spilled_objects_total', 0) for v in spill.values())} objects), restored "
          f"{fmt_b(sum(v.get('restored_bytes_total', 0) for v in spill.values()))}; spill files at most "
          f"{fmt_b(d.get('spill_files', 0))}. Local disk at most {fmt_b(d.get('total', 0))} (peaks: Ray temp dir "
          f"{fmt_b(d.get('ray_temp', 0))}, checkpoint staging {fmt_b(d.get('staging', 0))}, tracker staging "
          f"{fmt_b(d.get('tracking_staging', 0))}, run dir {fmt_b(d.get('run_dir', 0))}); at the end: "
          f"{len(res.get('staging_left', []))} checkpoint staging folders, "
          f"{len(res.get('tracking_staging_left', []))} tracker staging folders, skip list "
          f"{'left' if res.get('skip_list_left') else 'removed'}, checkpoints {res.get('checkpoints_at_end')}."]
    au = res.get("audit", {})
    if au.get("epochs"):
        L += ["", "Sample-id audit (`train.record_sample_ids`): " + ("**every epoch passes**" if au["ok"] else
                                                                     "**FAILED**") + ".", "",
              "| epoch | ok | consumed | duplicates | segments (first–end: ranks) | stale files (ids) |",
              "|---:|---|---:|---:|---|---:|"]
        for e in au["epochs"]:
            segs = ", ".join(f"{s['first']}–{s['end']}: {s['ranks']}" for s in e.get("segments", []))
            L.append(f"| {e['epoch']} | {'yes' if e['ok'] else 'NO'} | {e.get('consumed', '')} | "
                     f"{e.get('duplicates', '')} | {segs} | {e.get('stale_files', '')} ({e.get('stale_ids', '')}) |")
    probs = res.get("problems", [])
    L += ["", "What broke / problems: " + ("none." if not probs else "")]
    for pr in probs:
        L.append(f"- {pr.splitlines()[0][:400]}" + (" (details in the JSON)" if "\n" in pr else ""))
    L += ["", f"Details (events, per-process peaks, per-node spill, the audit's segments): `{res.get('json')}`.", ""]
    return L


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=50_000, help="training images")
    p.add_argument("--val-images", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=0, help="dataset seed (training uses train.seed)")
    p.add_argument("--tar-size", type=int, default=1000, help="samples per WebDataset tar")
    p.add_argument("--work-dir", default="/tmp/excb-rehearsal", help="dataset cache, logs, local run dirs")
    p.add_argument("--format", choices=("image_folder", "webdataset"), default="image_folder",
                   help="which uploaded layout training streams")
    p.add_argument("--run-storage", choices=("s3", "local"), default="s3")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps-per-epoch", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="global batch at 2 workers")
    p.add_argument("--checkpoint-every-steps", type=int, default=10)
    p.add_argument("--kill-epoch", type=int, default=2, help="SIGKILL in this epoch; node removed in the next")
    p.add_argument("--backbone", default="torchvision:resnet18")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--global-size", type=int, default=64)
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--num-local", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--object-store-mb", type=int, default=256, help="object store per node")
    p.add_argument("--resize-interval", type=float, default=10.0, help="train.elastic_resize_interval_s")
    p.add_argument("--upload-threads", type=int, default=16)
    p.add_argument("--sample-every", type=float, default=3.0)
    p.add_argument("--stall-timeout", type=float, default=900.0,
                   help="give up when neither a step nor a checkpoint came for this long")
    p.add_argument("--no-faults", action="store_true", help="no SIGKILL / node removal (a baseline run)")
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--keep-ray-temp", action="store_true",
                   help="keep Ray's temp dir (logs) also when nothing went wrong (kept anyway after problems)")
    p.add_argument("--results", default=str(ROOT / "experiments" / "RESULTS.md"))
    p.add_argument("--json", default=str(ROOT / "experiments" / "results" / "rehearsal_large_data.json"))
    p.add_argument("overrides", nargs="*", help="extra section.key=value config overrides")
    args = p.parse_args(argv)
    if not args.no_faults and (args.kill_epoch < 1 or args.epochs < args.kill_epoch + 2):
        p.error("need --epochs >= --kill-epoch + 2 (kill, node removal and growth need their epochs)")
    if args.batch_size % 2:
        p.error("--batch-size must be even (2 workers)")
    first_pass = min(args.images // args.batch_size, args.max_steps_per_epoch or 10**9) * args.batch_size
    if first_pass < PROTOTYPES:
        p.error(f"an epoch of {first_pass} images is too short for the k-means initialisation of {PROTOTYPES} "
                "prototypes (it draws from the first pass): raise --max-steps-per-epoch")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.time()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    work = Path(args.work_dir)
    out_dir = work / f"rehearsal-{run_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console()
    console_log = open(out_dir / "console.log", "a", buffering=1)
    sys.stdout = Tee(sys.__stdout__, console_log, console.on_line)
    sys.stderr = Tee(sys.__stderr__, console_log, console.on_line)
    cmd = shlex.join([".venv/bin/python", os.path.relpath(__file__, ROOT) if Path(__file__).is_relative_to(ROOT)
                      else __file__, *argv])
    res: dict[str, Any] = {"command": cmd, "started": started, "args": vars(args), "machine": {},
                           "status": "running", "out_dir": str(out_dir), "json": args.json, "problems": []}
    log(f"rehearsal {run_id}: logs in {out_dir}")
    rehearsal = None
    try:
        spec = kit.DatasetSpec(images=args.images, val_images=args.val_images, seed=args.seed,
                               tar_size=args.tar_size)
        t0 = time.time()
        ds = kit.build_dataset(spec, str(work), processes=2, log=log)
        res["dataset"] = {**ds, "phase_seconds": time.time() - t0}
        res["machine"] = machine()  # after the forked build: imports torch and Ray
        if not args.no_calibrate:
            log("calibrating: 3 synthetic training steps of this config (1 thread, no Ray) ...")
            res["calibration"] = calibrate(args)
        res["plan"] = plan(args, res.get("calibration", {}))
        p = res["plan"]
        log(f"PLAN: {args.epochs} epochs x {p['steps_per_epoch_at_2']} steps x global batch {args.batch_size} "
            f"({p['images_per_epoch_at_2']} images per epoch at 2 workers, {p['share_of_a_pass']:.1%} of a pass), "
            f"{p['checkpoints']} checkpoints; synthetic step "
            f"{res.get('calibration', {}).get('ms_per_step', float('nan')):.0f} ms -> about "
            f"{p['estimated_upload_seconds'] / 60:.0f} min of upload + {p['estimated_training_seconds'] / 60:.0f} min "
            f"of training incl. restarts; "
            + ("no faults" if args.no_faults else f"faults: SIGKILL in epoch {args.kill_epoch}, node removed in "
                                                  f"epoch {args.kill_epoch + 1}, added back after"))

        with kit.moto_server(str(out_dir / "moto.log")) as (endpoint, moto_pid):
            res["moto_pid"] = moto_pid
            log(f"moto_server PID {moto_pid} at {endpoint}")
            os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                              AWS_ENDPOINT_URL=endpoint)
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", endpoint_url=endpoint,
                                  config=Config(max_pool_connections=args.upload_threads + 4,
                                                retries={"max_attempts": 5}))
            client.create_bucket(Bucket=BUCKET)
            res["upload"] = {}
            for layout, prefix in (("folder", "folder"), ("wds", "wds")):
                log(f"uploading {layout} to s3://{BUCKET}/{prefix} ...")
                res["upload"][layout] = kit.upload_tree(client, BUCKET, Path(ds["root"]) / layout, prefix,
                                                        args.upload_threads)
                u = res["upload"][layout]
                log(f"uploaded {u['objects']} objects, {u['bytes'] / MIB:.0f} MiB in {u['seconds']:.0f}s")

            from excb.config import load_config

            data_uri = f"s3://{BUCKET}/{'folder' if args.format == 'image_folder' else 'wds'}"
            cfg = load_config(None, overrides(args, data_uri, endpoint, args.images))
            res["overrides"] = overrides(args, data_uri, endpoint, args.images)
            storage = f"s3://{BUCKET}/runs" if args.run_storage == "s3" else str(out_dir / "runs")
            name = f"rehearsal-{run_id}"
            res["run_dir"] = f"{storage}/{name}"
            rehearsal = Rehearsal(args, console, out_dir)
            rehearsal.train_rows = args.images
            log(f"starting the cluster and the run {res['run_dir']}")
            try:
                rehearsal.run(cfg, storage, name)
            finally:
                res.update(rehearsal.result)
                res["problems"] += rehearsal.problems
    except BaseException as e:  # noqa: BLE001 - reported in the results
        res["problems"].append("rehearsal stopped: " + "".join(traceback.format_exception(e))[-6000:])
    finally:
        res["wall_seconds"] = time.time() - started
        hist = res.get("history") or []
        if hist:
            images = sum(r["steps_per_epoch"] * r["global_batch"] for r in hist)
            secs = sum(r["epoch_seconds"] for r in hist)
            res["totals"] = {"images": images, "epoch_seconds": secs, "images_per_second": images / secs,
                             "images_per_fit_second": images / max(res.get("fit_wall_seconds", 0), 1e-9),
                             "data_wait_fraction": sum(r["data_wait_fraction"] * r["epoch_seconds"] for r in hist)
                             / secs}
        summary = (res.get("outcome") or {}).get("summary")
        res["status"] = "passed" if summary and not res["problems"] else "problems"
        if not res["machine"]:
            try:
                res["machine"] = machine()
            except Exception as e:  # noqa: BLE001
                res["machine"] = {"error": repr(e)}
        write_json(res, Path(args.json))
        try:
            lines = markdown(res)
        except Exception as e:  # noqa: BLE001 - a section that says what broke rather than none
            lines = [f"### Large-data rehearsal (issue 12) — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
                     f"`{res['command']}`", "", f"Result: **{res['status']}**; the report could not be formatted "
                     f"({e!r}). Problems:", *[f"- {p.splitlines()[0][:400]}" for p in res["problems"]],
                     "", f"Details: `{args.json}`.", ""]
        append_results(lines, Path(args.results))
        log(f"status: {res['status']}; wrote {args.json} and appended to {args.results}")
        for pr in res["problems"]:
            log("PROBLEM: " + pr.splitlines()[0][:300])
        sys.stdout.flush()
    return 0 if res["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
