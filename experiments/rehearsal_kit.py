"""Parts of the large-data rehearsal (``experiments/rehearsal_large_data.py``): the synthetic ImageNet-layout
dataset, the S3 server, the upload, process/disk sampling and the sample-id audit.

The dataset (``build_dataset``; every number below is a parameter of :class:`DatasetSpec`, defaults given)
--------------------------------------------------------------------------------------------------------
Fashion-MNIST items composited onto coloured canvases, JPEG-encoded. Image ``i`` of split ``s`` (``train``:
``images`` of them, items from the Fashion-MNIST train split; ``val``: ``val_images``, items from its test split)
is drawn from its own generator ``numpy.random.default_rng([seed, s, i])`` (``s`` = 0 train, 1 val), so an image
depends only on (seed, split, index), not on the process that makes it or on the order of the work:

- item: Fashion-MNIST item ``i mod len(split)`` (its class names the folder);
- canvas: longer side uniform in 160..400 px, aspect ratio (width / height) log-uniform in [3/4, 16/9], so sizes
  run from 120×160 (portrait 3:4) to 400×225 (16:9);
- background: a linear gradient between two uniform random RGB colours along a uniform random direction, plus
  Gaussian grain of a standard deviation uniform in [2, 12] (in 0..255 units);
- the item: scaled (bicubic) to a square of side uniform in [0.4, 0.95] × the canvas's shorter side, mirrored
  with probability 1/2, tinted: its pixels (``g`` in [0, 1]) are painted in a uniform random colour ``t`` shaded by
  ``0.35 + 0.65 g`` with opacity ``g`` × uniform [0.8, 1], at a uniform random position fully inside the canvas;
- encoding: Pillow JPEG, quality 85, 4:2:0 (Pillow's defaults otherwise).

Layout (``WORK/data-<tag>/``): ``folder/train/<class>/img<i:07d>.jpg`` and ``folder/val/<class>/img<i:07d>.jpg``,
class folders named after the ten Fashion-MNIST classes (``/`` and spaces as ``_``: ``T-shirt_top``, ``Ankle_boot``,
...); and the same images as WebDataset tars ``wds/train/shard-NNNNNN.tar`` / ``wds/val/shard-NNNNNN.tar`` of
``tar_size`` samples each, ``<key>.jpg`` + ``<key>.cls`` (key ``train_<i:07d>``; ``.cls`` = the index of the class
among the sorted folder names, the label excb gives the image-folder layout), samples shuffled across the tars with
``default_rng([seed, 99, s])``, tar headers with fixed mtime/owner so the tars' bytes depend only on the images.
``manifest.json`` (written last) holds the parameters, counts, bytes, Pillow's version and the tars' SHA-256: a run
with the same parameters reuses the build, and the same Pillow/libjpeg gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2  # bump when the recipe above changes (a new cache folder)
SPLITS = {"train": 0, "val": 1}
FM_SPLIT = {"train": "train", "val": "test"}


def class_folders() -> list[str]:
    """The ten Fashion-MNIST class names as folder names, in label order of Fashion-MNIST."""
    from excb.data.fashion_mnist import CLASSES

    return [c.replace("/", "_").replace(" ", "_") for c in CLASSES]


@dataclass(frozen=True)
class DatasetSpec:
    images: int = 50_000
    val_images: int = 2_000
    seed: int = 0
    tar_size: int = 1000
    quality: int = 85
    min_side: int = 160
    max_side: int = 400

    @property
    def tag(self) -> str:
        return (f"v{FORMAT_VERSION}-n{self.images}-val{self.val_images}-s{self.seed}-t{self.tar_size}"
                f"-q{self.quality}")


# --------------------------------------------------------------------------------------------- image synthesis

_FM: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _fm(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in _FM:
        from excb.data.fashion_mnist import load_fashion_mnist

        _FM[split] = load_fashion_mnist(FM_SPLIT[split], download=False)
    return _FM[split]


def make_image(spec: DatasetSpec, split: str, i: int) -> tuple[bytes, int]:
    """JPEG bytes of image ``i`` of ``split`` and its Fashion-MNIST label (see the module docstring)."""
    from PIL import Image

    items, labels = _fm(split)
    k = i % len(items)
    rng = np.random.default_rng([spec.seed, SPLITS[split], i])
    long_side = int(rng.integers(spec.min_side, spec.max_side + 1))
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(16 / 9)))  # width / height
    if aspect >= 1:
        w, h = long_side, max(1, round(long_side / aspect))
    else:
        w, h = max(1, round(long_side * aspect)), long_side
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    proj = (np.arange(w, dtype=np.float32)[None, :] * np.float32(math.cos(theta))
            + np.arange(h, dtype=np.float32)[:, None] * np.float32(math.sin(theta)))
    proj = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    canvas = c0 + (c1 - c0) * proj[..., None]  # float32 [h, w, 3]
    sigma = np.float32(rng.uniform(2, 12))
    canvas += sigma * rng.standard_normal((h, w, 1), dtype=np.float32)  # grain, same in all channels

    side = max(8, round(rng.uniform(0.4, 0.95) * min(w, h)))
    item = Image.fromarray(items[k]).resize((side, side), Image.BICUBIC)
    g = np.asarray(item, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        g = g[:, ::-1]
    tint = rng.uniform(0, 255, 3).astype(np.float32)
    opacity = np.float32(rng.uniform(0.8, 1.0))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    alpha = (g * opacity)[..., None]
    paint = tint[None, None, :] * (0.35 + 0.65 * g[..., None])
    region = canvas[y0:y0 + side, x0:x0 + side]
    canvas[y0:y0 + side, x0:x0 + side] = region * (1 - alpha) + paint * alpha
    out = Image.fromarray(np.clip(canvas, 0, 255, out=canvas).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=spec.quality)
    return buf.getvalue(), int(labels[k])


def image_path(root: Path, split: str, i: int, label: int) -> Path:
    return root / "folder" / split / class_folders()[label] / f"img{i:07d}.jpg"


def _write_images(job: tuple[DatasetSpec, str, str, int, int]) -> tuple[int, int]:
    """Make images ``[start, stop)`` of ``split`` into ``root``; returns (count, bytes)."""
    spec, root, split, start, stop = job
    n = size = 0
    for i in range(start, stop):
        data, label = make_image(spec, split, i)
        path = image_path(Path(root), split, i, label)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        n, size = n + 1, size + len(data)
    return n, size


def _tar_order(spec: DatasetSpec, split: str, count: int) -> np.ndarray:
    return np.random.default_rng([spec.seed, 99, SPLITS[split]]).permutation(count)


def _write_tar(job: tuple[str, str, list[tuple[int, str, int]]]) -> tuple[str, int, str]:
    """One WebDataset tar of ``members`` = (index, jpg path, cls); returns (name, bytes, sha256)."""
    dest, split, members = job
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, jpg, cls in members:
            key = f"{split}_{i:07d}"
            for name, data in ((f"{key}.jpg", Path(jpg).read_bytes()), (f"{key}.cls", str(cls).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    tmp = Path(dest + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return os.path.basename(dest), len(data), hashlib.sha256(data).hexdigest()


def _split_counts(spec: DatasetSpec) -> dict[str, int]:
    return {"train": spec.images, "val": spec.val_images}


def build_dataset(spec: DatasetSpec, work_dir: str, processes: int = 2, log: Any = print) -> dict[str, Any]:
    """Build (or reuse) the dataset under ``work_dir/data-<tag>``; returns its manifest with ``root`` and
    ``reused`` (``build_seconds`` is the time the build took when it was made)."""
    root = Path(work_dir) / f"data-{spec.tag}"
    manifest_file = root / "manifest.json"
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("spec") == asdict(spec):
            log(f"dataset: reusing {root} (built before in {manifest['build_seconds']:.0f}s)")
            return {**manifest, "root": str(root), "reused": True}
    if root.exists():
        shutil.rmtree(root)  # a build that did not finish
    root.mkdir(parents=True)
    for split in SPLITS:  # the Fashion-MNIST files must be there before forking
        _fm(split)
    folders = class_folders()
    t0 = time.time()
    ctx = multiprocessing.get_context("fork")
    summary: dict[str, Any] = {"spec": asdict(spec), "classes_sorted": sorted(folders), "splits": {}}
    with ctx.Pool(processes) as pool:
        for split, count in _split_counts(spec).items():
            t1 = time.time()
            chunk = 250
            jobs = [(spec, str(root), split, a, min(a + chunk, count)) for a in range(0, count, chunk)]
            made = size = 0
            for n, b in pool.imap_unordered(_write_images, jobs):
                made, size = made + n, size + b
                if made % 5000 < chunk or made == count:
                    rate = made / max(time.time() - t1, 1e-9)
                    log(f"dataset: {split} {made}/{count} JPEGs ({size / 2**20:.0f} MiB, {rate:.0f} img/s)")
            summary["splits"][split] = {"images": made, "jpeg_bytes": size, "jpeg_seconds": time.time() - t1}
        sorted_index = {c: j for j, c in enumerate(sorted(folders))}
        for split, count in _split_counts(spec).items():
            t1 = time.time()
            labels = _fm(split)[1]
            order = _tar_order(spec, split, count)
            members = []
            for i in order:
                label = int(labels[int(i) % len(labels)])
                members.append((int(i), str(image_path(root, split, int(i), label)),
                                sorted_index[folders[label]]))
            tar_dir = root / "wds" / split
            tar_dir.mkdir(parents=True, exist_ok=True)
            jobs_t = [(str(tar_dir / f"shard-{j // spec.tar_size:06d}.tar"), split, members[j:j + spec.tar_size])
                      for j in range(0, count, spec.tar_size)]
            tars = sorted(pool.imap_unordered(_write_tar, jobs_t))
            summary["splits"][split].update(
                tars=len(tars), tar_bytes=sum(b for _, b, _ in tars), tar_seconds=time.time() - t1,
                tar_sha256={name: digest for name, _, digest in tars})
            log(f"dataset: {split} packed into {len(tars)} tars ({sum(b for _, b, _ in tars) / 2**20:.0f} MiB)")
    summary["build_seconds"] = time.time() - t0
    import PIL

    summary["pillow"] = PIL.__version__
    summary["image_size_sample"] = image_size_stats(root, spec)
    tmp = manifest_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
    tmp.replace(manifest_file)
    log(f"dataset: built in {summary['build_seconds']:.0f}s at {root}")
    return {**summary, "root": str(root), "reused": False}


def image_size_stats(root: Path, spec: DatasetSpec, sample: int = 500) -> dict[str, Any]:
    """Width/height/aspect/bytes of the first ``sample`` train images (a check that the variety is there)."""
    from PIL import Image

    labels = _fm("train")[1]
    ws, hs, bs = [], [], []
    for i in range(min(sample, spec.images)):
        p = image_path(root, "train", i, int(labels[i % len(labels)]))
        with Image.open(p) as im:
            ws.append(im.width)
            hs.append(im.height)
        bs.append(p.stat().st_size)
    ar = np.asarray(ws) / np.asarray(hs)
    return {"images": len(ws), "width": [min(ws), max(ws)], "height": [min(hs), max(hs)],
            "aspect_w_over_h": [round(float(ar.min()), 3), round(float(ar.max()), 3)],
            "portrait_share": round(float((ar < 1).mean()), 3),
            "jpeg_kib_mean": round(float(np.mean(bs)) / 1024, 1)}


# ------------------------------------------------------------------------------------------------- S3 server

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server(log_file: str, start_timeout_s: float = 120.0) -> Iterator[tuple[str, int]]:
    """Run the real ``moto_server`` executable (next to this Python) on a free port; yields ``(url, pid)``. It is
    stopped by its PID on the way out (SIGTERM, then SIGKILL after 10 s)."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.is_file():
        raise RuntimeError(f"{exe} not installed (pip install 'moto[server]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_file, "ab") as log:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                stderr=log, env={**os.environ})
    pid = proc.pid
    try:
        deadline = time.time() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode} before answering on {url}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {url} in {start_timeout_s:.0f}s") from None
                time.sleep(0.1)
        yield url, pid
    finally:
        if proc.poll() is None:
            os.kill(pid, 15)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(pid, 9)
                proc.wait()


def upload_tree(client: Any, bucket: str, local_root: Path, prefix: str, threads: int = 16) -> dict[str, Any]:
    """Upload every file under ``local_root`` to ``s3://bucket/prefix/<relative path>`` with ``threads`` parallel
    PUTs; returns objects, bytes and seconds."""
    files = sorted(p for p in local_root.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    t0 = time.time()
    lock = threading.Lock()
    done = {"objects": 0, "bytes": 0}

    def put(path: Path) -> None:
        data = path.read_bytes()
        key = f"{prefix}/{path.relative_to(local_root).as_posix()}"
        for attempt in range(5):
            try:
                client.put_object(Bucket=bucket, Key=key, Body=data)
                break
            except Exception:  # noqa: BLE001 - a busy local server; retried, then raised
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
        with lock:
            done["objects"] += 1
            done["bytes"] += len(data)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))
    seconds = time.time() - t0
    return {"objects": done["objects"], "bytes": done["bytes"], "seconds": seconds,
            "objects_per_second": done["objects"] / max(seconds, 1e-9),
            "mib_per_second": done["bytes"] / 2**20 / max(seconds, 1e-9)}


# ------------------------------------------------------------------------------------------ disk and processes

def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk (allocated blocks) of everything under ``path``; 0 if it does not exist."""
    total = 0
    for dirpath, _dirs, files in os.walk(path, onerror=lambda e: None):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def classify(cmdline: list[str]) -> str:
    """``train_worker`` | ``ray_worker`` (tasks and other actors) | ``ray_system`` | ``s3_server`` | ``other``."""
    joined = " ".join(cmdline)
    if "moto_server" in joined:
        return "s3_server"
    if "RayTrainWorker" in joined:
        return "train_worker"
    if (cmdline and cmdline[0].startswith("ray::")) or "default_worker.py" in joined:
        return "ray_worker"  # a worker process still starting runs setup_worker.py / default_worker.py
    if any(k in joined for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "ray/_private",
                                 "ray_client_server", "runtime_env", "monitor.py")):
        return "ray_system"
    return "other"


KIND_RANK = {"other": 0, "ray_system": 1, "s3_server": 1, "ray_worker": 2, "train_worker": 3}


class ProcessSampler:
    """Resident memory of this process (the driver) and of every process below it (the simulated cluster's Ray
    processes, the S3 server), sampled by :meth:`sample`. A Ray worker's figure includes its own children.
    Shared pages (the object store's memory map, which a worker touching an object maps in) count in RSS, so
    the sum over processes over-counts them; ``shared`` is kept per process for that reason."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.per_pid: dict[int, dict[str, Any]] = {}
        self.peak_totals: dict[str, int] = {}
        self.peak_driver = 0
        self.peak_system_used = 0
        self.samples = 0

    def _rss(self, p: Any) -> tuple[int, int]:
        m = p.memory_info()
        return int(m.rss), int(getattr(m, "shared", 0))

    def sample(self) -> dict[str, Any]:
        ps = self.psutil
        now = time.time()
        totals: dict[str, int] = {}
        try:
            rss, _ = self._rss(self.me)
        except ps.Error:
            rss = 0
        self.peak_driver = max(self.peak_driver, rss)
        kids = self.me.children(recursive=True)
        kid_pids = {k.pid for k in kids}
        for p in kids:
            try:
                cmd = p.cmdline()
                kind = classify(cmd)
                r, shared = self._rss(p)
                if kind in ("train_worker", "ray_worker"):  # include the worker's own children
                    for c in p.children(recursive=True):
                        if c.pid in kid_pids and classify(c.cmdline()) == "other":
                            r += self._rss(c)[0]
                elif kind == "other" and p.parent() is not None and p.parent().pid != self.me.pid:
                    continue  # counted with its Ray worker
            except ps.Error:
                continue
            title = cmd[0][:80] if cmd else "?"
            rec = self.per_pid.setdefault(p.pid, {"pid": p.pid, "kind": kind, "title": title, "peak_rss": 0,
                                                  "peak_shared": 0, "first_seen": now, "titles": []})
            if KIND_RANK[kind] > KIND_RANK[rec["kind"]]:  # a worker process becomes what it runs
                rec["kind"] = kind
            if title not in rec["titles"] and len(rec["titles"]) < 6:
                rec["titles"].append(title)
            rec["peak_rss"] = max(rec["peak_rss"], r)
            rec["peak_shared"] = max(rec["peak_shared"], shared)
            rec["last_seen"] = now
            totals[kind] = totals.get(kind, 0) + r
        totals["driver"] = rss
        totals["all_ray"] = sum(v for k, v in totals.items() if k in ("train_worker", "ray_worker", "ray_system"))
        for k, v in totals.items():
            self.peak_totals[k] = max(self.peak_totals.get(k, 0), v)
        used = ps.virtual_memory().total - ps.virtual_memory().available
        self.peak_system_used = max(self.peak_system_used, used)
        self.samples += 1
        return {"t": now, "rss": totals, "system_used": used}

    def train_worker_pids(self) -> list[int]:
        out = []
        for p in self.me.children(recursive=True):
            try:
                if classify(p.cmdline()) == "train_worker":
                    out.append(p.pid)
            except self.psutil.Error:
                continue
        return sorted(out)

    def report(self) -> dict[str, Any]:
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for rec in self.per_pid.values():
            by_kind.setdefault(rec["kind"], []).append(rec)
        out: dict[str, Any] = {"samples": self.samples, "driver_peak_rss": self.peak_driver,
                               "peak_total_rss_by_kind": dict(self.peak_totals),
                               "peak_machine_used": self.peak_system_used,
                               "train_workers": sorted(({k: r[k] for k in ("pid", "peak_rss", "peak_shared",
                                                                           "first_seen", "last_seen")}
                                                        for r in by_kind.get("train_worker", [])),
                                                       key=lambda r: r["first_seen"])}
        for kind in ("ray_worker", "ray_system", "s3_server", "other"):
            recs = sorted(by_kind.get(kind, []), key=lambda r: -r["peak_rss"])
            out[kind] = {"processes": len(recs), "max_peak_rss": recs[0]["peak_rss"] if recs else 0,
                         "top": [{k: r[k] for k in ("pid", "peak_rss", "titles")} for r in recs[:5]]}
        return out


# ------------------------------------------------------------------------------------------ sample-id audit

def audit_sample_ids(run_dir: str, history: list[dict[str, Any]], train_rows: int) -> dict[str, Any]:
    """Check the data-order guarantee from ``RUN/sample_ids`` (``train.record_sample_ids``), as
    ``tests/test_scale_out.py``'s ``_passes`` does, extended to a group size that changes inside an epoch.

    Per epoch: rank 0's stretches are followed back from the one that reached the epoch's end (``[first, end)``
    in the epoch's global image count; among stretches with the same bounds, written by an attempt that was
    killed before its checkpoint persisted and by the one that resumed, the newest file counts). That gives the
    persisted boundaries ``0 = b0 < b1 < ... < bk = end``; each segment ``[b_i, b_i+1)`` was trained by one
    group: its ranks are the files with exactly those bounds. Checks: every rank of a segment consumed
    ``(b_i+1 - b_i) / ranks`` ids, no id twice in the epoch (across ranks, segments and attempts), ``end`` is
    what the finishing group's plan says (``r + (steps - ceil(r / batch)) * batch`` for an epoch resumed at image
    ``r``), and the ids not consumed are at most the drop-last remainder of a full pass (when the epoch is a full
    pass; a capped epoch, ``train.max_steps_per_epoch``, consumes ``steps × batch``). Stretches off the chain are
    work of killed attempts that the final state does not contain (counted, not checked)."""
    import pyarrow.fs as pafs

    from excb.rundir.runfiles import SAMPLE_IDS_DIR
    from excb.storage import join, read_text, resolve_fs

    fs, path = resolve_fs(join(run_dir, SAMPLE_IDS_DIR))
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
             if i.type == pafs.FileType.File and i.base_name.endswith(".txt")]
    files: dict[int, list[dict[str, Any]]] = {}
    for info in infos:
        epoch, rank, first, end, _attempt = info.base_name[:-4].split("-")
        files.setdefault(int(epoch[5:]), []).append({
            "name": info.base_name, "rank": int(rank[4:]), "first": int(first), "end": int(end),
            "mtime": info.mtime_ns or 0, "uri": join(run_dir, SAMPLE_IDS_DIR, info.base_name)})
    rows = {r["epoch"]: r for r in history}
    epochs_out, problems = [], []
    for epoch in sorted(set(files) | set(rows)):
        parts, row = files.get(epoch, []), rows.get(epoch)
        e: dict[str, Any] = {"epoch": epoch, "files": len(parts)}
        if row is None:
            problems.append(f"epoch {epoch}: sample-id files but no metrics row (epoch not finished)")
            epochs_out.append({**e, "ok": False})
            continue
        if not parts:
            problems.append(f"epoch {epoch}: no sample-id files")
            epochs_out.append({**e, "ok": False})
            continue
        r0 = [p for p in parts if p["rank"] == 0]
        tail = max(r0, key=lambda p: (p["end"], p["mtime"]))
        chain = [tail]
        while chain[-1]["first"] > 0:
            prev = [p for p in r0 if p["end"] == chain[-1]["first"]]
            if not prev:
                problems.append(f"epoch {epoch}: rank 0 has no stretch ending at {chain[-1]['first']}")
                break
            chain.append(max(prev, key=lambda p: p["mtime"]))
        chain.reverse()
        seen: dict[str, int] = {}
        used, segments, ok = set(), [], True
        for seg in chain:
            members: dict[int, dict[str, Any]] = {}
            for p in parts:
                if (p["first"], p["end"]) == (seg["first"], seg["end"]):
                    if p["rank"] not in members or p["mtime"] > members[p["rank"]]["mtime"]:
                        members[p["rank"]] = p
            world = len(members)
            want = (seg["end"] - seg["first"]) / world
            counts = {}
            for rank, p in sorted(members.items()):
                ids = read_text(p["uri"]).split()
                used.add(p["name"])
                counts[rank] = len(ids)
                if len(ids) != want:
                    ok = False
                    problems.append(f"epoch {epoch} [{seg['first']}, {seg['end']}) rank {rank}: {len(ids)} ids, "
                                    f"expected {want:g}")
                for i in ids:
                    seen[i] = seen.get(i, 0) + 1
            if sorted(members) != list(range(world)):
                ok = False
                problems.append(f"epoch {epoch} [{seg['first']}, {seg['end']}): ranks {sorted(members)}")
            segments.append({"first": seg["first"], "end": seg["end"], "ranks": world, "per_rank": counts})
        end = chain[-1]["end"] if chain else 0
        twice = sum(1 for v in seen.values() if v > 1)
        foreign = sum(1 for i in seen if not i.startswith("train"))  # not a training image's id
        if foreign:
            problems.append(f"epoch {epoch}: {foreign} ids are not training images (e.g. "
                            f"{next(i for i in seen if not i.startswith('train'))})")
        gb, spe = int(row["global_batch"]), int(row["steps_per_epoch"])
        r = int(row.get("resumed_at_images", 0))
        expected_end = r + (spe - -(-r // gb)) * gb
        full_pass = spe == train_rows // gb
        missing = train_rows - len(seen)
        if twice:
            ok = False
            problems.append(f"epoch {epoch}: {twice} ids consumed more than once")
        if sum(seen.values()) != end:
            ok = False
            problems.append(f"epoch {epoch}: {sum(seen.values())} ids recorded for {end} images")
        if end != expected_end:
            ok = False
            problems.append(f"epoch {epoch}: ended at image {end}, the plan says {expected_end}")
        if full_pass and missing > train_rows - spe * gb + gb:
            ok = False
            problems.append(f"epoch {epoch}: {missing} rows not consumed, more than the drop-last remainder")
        stale = [p for p in parts if p["name"] not in used]
        e.update(ok=ok and not any(p.startswith(f"epoch {epoch}:") for p in problems),
                 consumed=len(seen), end=end, expected_end=expected_end, duplicates=twice, foreign_ids=foreign,
                 missing=missing, full_pass=full_pass,
                 drop_last_remainder=train_rows - (train_rows // gb) * gb,
                 resumed_at_images=r, segments=segments, stale_files=len(stale),
                 stale_ids=sum(len(read_text(p["uri"]).split()) for p in stale))
        epochs_out.append(e)
    return {"ok": not problems and all(e["ok"] for e in epochs_out), "problems": problems, "epochs": epochs_out}
