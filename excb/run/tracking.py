"""Experiment tracking: a run's scalars written from the rank-0 Ray Train worker to TensorBoard, W&B and MLflow.

Ray Train's documented pattern for experiment trackers is to call each library's own API inside the training
function, on the rank-0 worker only. :func:`open_trackers` does that for the trackers the ``tracking`` config
section enables; other ranks use :data:`NULL_TRACKER`::

    tracker = open_trackers(cfg, run_dir, resume_step=step) if rank == 0 else NULL_TRACKER
    try:
        ...
        tracker.log_step(step, {"loss": ..., "lr": ..., "images_per_second": ...})   # every log interval
        ...
        tracker.log_epoch(epoch, step, metrics)                                     # every epoch end
    finally:
        tracker.close()

Tags: ``train/<key>`` per log interval, ``epoch/<key>`` per epoch (plus ``epoch/epoch``), all on the global step
axis. Values that are not real numbers (or not finite) are skipped: pass Python or NumPy numbers (``float(t)`` for
a tensor), not tensors or strings.

- **TensorBoard** (default on): one event file per attempt in ``RUN/tensorboard/``. It is written in a local
  folder and copied into the run directory (local, ``s3://`` or ``gs://``) atomically at every epoch end, every
  ``tracking.upload_every_s`` within an epoch, and at :meth:`Tracker.close`. File names sort in attempt order, and
  each file starts with TensorBoard's purge marker at ``resume_step + 1``: what an interrupted attempt logged past
  the checkpoint a resumed attempt starts from is discarded by TensorBoard, nothing is shown twice.
- **W&B** (``tracking.wandb``): ``wandb.init`` with the run's id kept in ``RUN/tracking.json``, so every attempt
  resumes the same W&B run (W&B ignores values logged for steps up to the run's last one, so steps an interrupted
  attempt had logged keep its values). Offline mode writes the run files to ``RUN/wandb/`` (``wandb sync`` them
  later). The API key is read by wandb itself from ``WANDB_API_KEY``.
- **MLflow** (``tracking.mlflow``): an :class:`mlflow.tracking.MlflowClient` run (id also in ``RUN/tracking.json``)
  at ``tracking.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a file store in ``RUN/mlruns`` (for
  which ``MLFLOW_ALLOW_FILE_STORE=true`` is set in the process: MLflow 3 refuses file stores otherwise). MLflow
  keeps every value logged, so steps redone after a resume have the values of both attempts; the run is tagged
  ``excb.resumed_from_step``.

Credentials come only from the environment, read by the libraries themselves: nothing here logs them or writes
them anywhere. Failures while logging are warned once per tracker (logger ``excb.run.tracking``) and do not stop
training; failures at open time raise.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import numbers
import os
import posixpath
import re
import secrets
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pyarrow.fs as pafs

from excb.config import ConfigError, ExcbConfig, redacted_dict
from excb.storage import join, read_text, resolve_fs, write_json

__all__ = [
    "MLFLOW_DIR",
    "NULL_TRACKER",
    "STATE_FILE",
    "TENSORBOARD_DIR",
    "WANDB_DIR",
    "Tracker",
    "TrackingError",
    "check_available",
    "open_trackers",
    "worker_env",
]

TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/events.out.tfevents.*
WANDB_DIR = "wandb"  # RUN/wandb/ (W&B's own folder layout)
MLFLOW_DIR = "mlruns"  # RUN/mlruns/ (MLflow file store, when no tracking URI is given)
STATE_FILE = "tracking.json"  # RUN/tracking.json: the W&B and MLflow run ids, so attempts continue the same runs

_STAGING_PREFIX = "excb-track-"  # local staging folders: excb-track-<pid>-<random>
_STALE_STAGING_S = 3600.0  # a staging folder of a dead process untouched this long is removed
_SECRET_ENV = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN")
_ENV_FOR = {  # what each tracker reads from the environment (for :func:`worker_env`)
    "wandb": ("WANDB_API_KEY", "WANDB_BASE_URL"),
    "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH"),
}
_TAG_CHARS = re.compile(r"[^A-Za-z0-9_.\-/]")
_PARAM_BATCH = 100  # MLflow: params per log_batch call
_PARAM_VALUE_MAX = 6000  # MLflow: longest param value

_log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """A tracker could not be started (the message names it; credentials are never part of it)."""


def _scrub(text: str) -> str:
    """``text`` with the values of known credential variables replaced by ``***``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, "***")
    return text


def _tags(prefix: str, scalars: Mapping[str, Any]) -> dict[str, float]:
    """``{prefix/key: float}`` for the finite real numbers of ``scalars`` (bools and other types are skipped)."""
    out: dict[str, float] = {}
    for key, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        number = float(value)
        if math.isfinite(number):
            out[f"{prefix}/{_TAG_CHARS.sub('_', str(key))}"] = number
    return out


class _Backend(Protocol):
    name: str

    def write(self, step: int, tags: dict[str, float]) -> None: ...

    def tick(self) -> None: ...  # after a log step: time-based uploads

    def flush(self) -> None: ...  # at an epoch end

    def close(self) -> None: ...


class Tracker:
    """Writes a run's scalars to the trackers it holds (none: :data:`NULL_TRACKER`). Use it on rank 0 only."""

    def __init__(self, backends: list[_Backend] | None = None) -> None:
        self._backends = list(backends or [])
        self._failed: set[tuple[str, str]] = set()
        self._closed = False

    @property
    def names(self) -> list[str]:
        """The trackers written to, e.g. ``["tensorboard", "wandb"]``."""
        return [b.name for b in self._backends]

    def _each(self, action: str, call: Callable[[_Backend], None]) -> None:
        for backend in self._backends:
            try:
                call(backend)
            except Exception as exc:  # noqa: BLE001 - a tracker's hiccup must not stop a days-long run
                if (backend.name, action) not in self._failed:
                    self._failed.add((backend.name, action))
                    _log.warning("tracking: %s %s failed (%s); training goes on, further failures of this kind "
                                 "are not reported", backend.name, action, _scrub(f"{type(exc).__name__}: {exc}"))

    def log_step(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Scalars of one logging interval at global step ``step``, as ``train/<key>``."""
        if self._closed or not self._backends:
            return
        tags = _tags("train", scalars)
        if tags:
            self._each("log", lambda b: b.write(int(step), tags))
        self._each("upload", lambda b: b.tick())

    def log_epoch(self, epoch: int, step: int, scalars: Mapping[str, Any]) -> None:
        """Scalars of a finished epoch (loss, lr, cluster balance, kNN, ...) at global step ``step``, as
        ``epoch/<key>`` plus ``epoch/epoch``; ``epoch`` and ``step`` keys of ``scalars`` are the axes, not logged.
        Then every tracker persists what it has (TensorBoard: the event file is copied into the run dir)."""
        if self._closed or not self._backends:
            return
        tags = _tags("epoch", {k: v for k, v in scalars.items() if k not in ("epoch", "step")})
        tags["epoch/epoch"] = float(epoch)
        self._each("log", lambda b: b.write(int(step), tags))
        self._each("upload", lambda b: b.flush())

    def close(self) -> None:
        """Persist and close every tracker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._each("close", lambda b: b.close())

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NULL_TRACKER = Tracker()  # for ranks other than 0 and runs with every tracker off


# ---------------------------------------------------------------------------------------------------- helpers

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest_mtime(folder: str) -> float:
    newest = os.path.getmtime(folder)
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                newest = max(newest, os.path.getmtime(os.path.join(root, name)))
            except OSError:
                pass
    return newest


def _remove_stale_staging() -> None:
    """Remove staging folders that killed processes on this machine left behind (dead pid, idle for an hour)."""
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), f"{_STAGING_PREFIX}*-*")):
        try:
            pid = int(os.path.basename(folder)[len(_STAGING_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        try:
            if not _pid_alive(pid) and time.time() - _newest_mtime(folder) > _STALE_STAGING_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def _staging_dir(what: str, run_dir: str) -> str:
    """A local folder under the run's :func:`excb.rundir.checkpoint.staging_root`, so the next attempt of the run
    on this machine removes what a killed one left (``clear_staging``)."""
    from excb.rundir.checkpoint import staging_root

    root = staging_root(run_dir)
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"track-{os.getpid()}-{what}-", dir=root)


def _put_file(fs: pafs.FileSystem, local: str, dest: str) -> None:
    """Copy a local file to ``dest`` via a hidden temporary sibling and a move: readers (TensorBoard watching the
    folder) never see a partial file, nor a temporary one that looks like an event file."""
    folder = posixpath.dirname(dest)
    fs.create_dir(folder, recursive=True)
    tmp = posixpath.join(folder, f".excb-upload-{uuid.uuid4().hex}.tmp")
    try:
        with open(local, "rb") as src, fs.open_output_stream(tmp) as out:
            shutil.copyfileobj(src, out, 1 << 20)
        fs.move(tmp, dest)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def _read_state(run_dir: str) -> dict[str, Any]:
    try:
        state = json.loads(read_text(join(run_dir, STATE_FILE)))
    except (FileNotFoundError, OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _run_name(cfg: ExcbConfig, run_dir: str) -> str:
    return cfg.tracking.run_name or posixpath.basename(run_dir.rstrip("/").replace(os.sep, "/")) or "excb"


def _flat_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:_PARAM_VALUE_MAX]
    return out


# ---------------------------------------------------------------------------------------------------- TensorBoard

def _summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package, a dependency of excb).

    Not tensorboardX's writer: its ``flush()`` does not wait for the events still queued for its writer thread
    (only ``close()`` does), so a copy taken at an epoch end could miss that epoch's scalars."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tracking.tensorboard=true needs the tensorboard package: pip install 'tensorboard>=2.16' "
                          "(or set tracking.tensorboard=false)") from None
    return SummaryWriter


_EVENT_PREFIX = "events.out.tfevents."


def _event_file_name(fs: pafs.FileSystem, folder: str) -> str:
    """A new event file name that sorts after every event file already in ``folder`` (TensorBoard reads a folder's
    files in name order, and the purge marker only affects files read before it)."""
    newest = 0
    for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        base = posixpath.basename(info.path)
        if base.startswith(_EVENT_PREFIX):
            stamp = base[len(_EVENT_PREFIX):].split(".", 1)[0]
            if stamp.isdigit():
                newest = max(newest, int(stamp))
    stamp = max(int(time.time()), newest + 1)
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
    return f"{_EVENT_PREFIX}{stamp:010d}.{host}.{os.getpid()}.excb"


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: str, resume_step: int, upload_every_s: float) -> None:
        writer_class = _summary_writer_class()
        self._fs, folder = resolve_fs(join(run_dir, TENSORBOARD_DIR))
        self._dest = posixpath.join(folder, _event_file_name(self._fs, folder))
        self._staging = _staging_dir("tb", run_dir)
        # purge_step: TensorBoard drops the events of earlier files at steps >= resume_step + 1 (logged by an
        # interrupted attempt after the checkpoint this one resumes from); the epoch row at resume_step stays.
        self._writer = writer_class(self._staging, purge_step=int(resume_step) + 1, flush_secs=30)
        self._upload_every_s = upload_every_s
        self._last_upload = time.monotonic()
        self._closed = False

    def _local_file(self) -> str | None:
        files = sorted(glob.glob(os.path.join(self._staging, "*tfevents*")))
        return files[0] if files else None

    def write(self, step: int, tags: dict[str, float]) -> None:
        wall = time.time()
        for tag, value in tags.items():
            self._writer.add_scalar(tag, value, global_step=step, walltime=wall)

    def _upload(self) -> None:
        self._writer.flush()
        local = self._local_file()
        if local is not None:
            _put_file(self._fs, local, self._dest)
        self._last_upload = time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self._last_upload >= self._upload_every_s:
            self._upload()

    def flush(self) -> None:
        self._upload()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
            self._upload()
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- W&B

class _Wandb:
    name = "wandb"

    def __init__(self, cfg: ExcbConfig, run_dir: str, resume_step: int, state: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        tr = cfg.tracking
        self._remote = "://" in run_dir
        self._offline = tr.wandb_mode == "offline"
        self._run_dir = run_dir
        # Local run dirs hold W&B's folder directly; remote ones get a local staging folder, whose offline run
        # files are copied to RUN/wandb/ at each epoch end and at close.
        self._root = _staging_dir("wandb", run_dir) if self._remote else run_dir
        if not state.get("wandb_run_id"):
            state["wandb_run_id"] = secrets.token_hex(8)
            write_json(join(run_dir, STATE_FILE), state)
        elif self._offline:
            # An offline run's folder is named offline-run-<start second>-<id>: an attempt starting in the same
            # second as the previous one would reuse (and overwrite) that attempt's folder.
            time.sleep(1.001 - time.time() % 1.0)
        try:
            self._run = wandb.init(
                project=tr.wandb_project, entity=tr.wandb_entity or None, mode=tr.wandb_mode,
                id=state["wandb_run_id"], resume="allow", name=_run_name(cfg, run_dir), dir=self._root,
                config=redacted_dict(cfg),
                settings=wandb.Settings(silent=True, console="off", save_code=False, disable_git=True),
            )
        except Exception as exc:
            self._cleanup()
            raise TrackingError(_scrub(f"W&B: could not start the run: {type(exc).__name__}: {exc}")) from None
        if resume_step > 0:
            self._run.summary["excb/resumed_from_step"] = int(resume_step)
        self._closed = False

    def write(self, step: int, tags: dict[str, float]) -> None:
        self._run.log(tags, step=step)

    def tick(self) -> None:
        pass

    def _upload_offline(self) -> None:
        if not (self._remote and self._offline):
            return
        fs, dest = resolve_fs(join(self._run_dir, WANDB_DIR))
        local_root = os.path.join(self._root, WANDB_DIR)
        for root, _dirs, files in os.walk(local_root):
            for name in files:
                path = os.path.join(root, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                rel = os.path.relpath(path, local_root).replace(os.sep, "/")
                _put_file(fs, path, posixpath.join(dest, rel))

    def flush(self) -> None:
        self._upload_offline()

    def _cleanup(self) -> None:
        if self._remote:
            shutil.rmtree(self._root, ignore_errors=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run.finish()
            # finish() can return before W&B's service has written the run file's last records; teardown waits
            # for it (and stops the service: Ray may kill the worker before W&B's own exit hook would run).
            self._wandb.teardown()
            self._upload_offline()
        finally:
            self._cleanup()


# ---------------------------------------------------------------------------------------------------- MLflow

def _mlflow_uri(cfg: ExcbConfig, run_dir: str) -> str:
    uri = cfg.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if "://" in run_dir:
        raise ConfigError(f"tracking.mlflow: the default file store (RUN/{MLFLOW_DIR}) needs a local run directory, "
                          f"not {run_dir}; set tracking.mlflow_tracking_uri or MLFLOW_TRACKING_URI (e.g. an MLflow "
                          f"server's http(s):// address)")
    return Path(os.path.abspath(os.path.join(run_dir, MLFLOW_DIR))).as_uri()


class _Mlflow:
    name = "mlflow"

    def __init__(self, cfg: ExcbConfig, run_dir: str, resume_step: int, state: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        uri = _mlflow_uri(cfg, run_dir)
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
        try:
            self._client = MlflowClient(tracking_uri=uri)
            run_id = state.get("mlflow_run_id")
            run = None
            if run_id:
                try:
                    run = self._client.get_run(run_id)
                except MlflowException:
                    run = None  # another tracking server than the earlier attempt's: a new run
            if run is not None:
                self._client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                if resume_step > 0:
                    self._client.set_tag(run.info.run_id, "excb.resumed_from_step", str(int(resume_step)))
            else:
                name = cfg.tracking.mlflow_experiment
                experiment = self._client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
                run = self._client.create_run(experiment_id, run_name=_run_name(cfg, run_dir),
                                              tags={"excb.run_dir": run_dir})
                params = [Param(k, v) for k, v in _flat_params(redacted_dict(cfg)).items()]
                for i in range(0, len(params), _PARAM_BATCH):
                    self._client.log_batch(run.info.run_id, params=params[i:i + _PARAM_BATCH])
                state["mlflow_run_id"] = run.info.run_id
                write_json(join(run_dir, STATE_FILE), state)
        except ConfigError:
            raise
        except Exception as exc:
            raise TrackingError(_scrub(f"MLflow: could not start the run: {type(exc).__name__}: {exc}")) from None
        self._run_id = run.info.run_id
        self._closed = False

    def write(self, step: int, tags: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self._metric(tag, value, stamp, step) for tag, value in tags.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self._client.log_batch(self._run_id, metrics=metrics[i:i + 1000])

    def tick(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.set_terminated(self._run_id, status="FINISHED")


# ---------------------------------------------------------------------------------------------------- opening

def check_available(cfg: ExcbConfig) -> None:
    """Raise :class:`ConfigError` naming the pip extra when an enabled tracker's library is not installed (call it
    on the driver before starting Ray to fail fast; :func:`open_trackers` calls it too)."""
    tr = cfg.tracking
    if tr.tensorboard:
        _summary_writer_class()
    for enabled, module, extra, key in ((tr.wandb, "wandb", "wandb", "tracking.wandb"),
                                        (tr.mlflow, "mlflow", "mlflow", "tracking.mlflow")):
        if not enabled:
            continue
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"{key}=true needs the {module} package: pip install 'excb[{extra}]' "
                              f"(or set {key}=false)") from None


def worker_env(cfg: ExcbConfig) -> dict[str, str]:
    """The environment variables the enabled trackers read, as set in this process, for Ray's
    ``runtime_env={"env_vars": ...}`` (Ray Train's guide forwards ``WANDB_API_KEY`` that way). The values are
    credentials: never print, log or save the returned mapping."""
    names = [*(_ENV_FOR["wandb"] if cfg.tracking.wandb else ()), *(_ENV_FOR["mlflow"] if cfg.tracking.mlflow else ())]
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def open_trackers(cfg: ExcbConfig, run_dir: str, *, resume_step: int) -> Tracker:
    """Open the trackers ``cfg.tracking`` enables for the run in ``run_dir`` (local path or ``s3://`` / ``gs://``).

    Call on the rank-0 worker (others use :data:`NULL_TRACKER`), with ``resume_step`` the global step of the
    checkpoint the attempt starts from (0 for a fresh start).

    Raises:
        ConfigError: a tracker's library is not installed (naming the pip extra), W&B online without
            ``WANDB_API_KEY``, or MLflow's default file store asked for a remote run directory.
        TrackingError: a tracker's library failed to start its run.
    """
    if resume_step < 0:
        raise ValueError(f"resume_step must be >= 0, got {resume_step}")
    check_available(cfg)
    tr = cfg.tracking
    if not (tr.tensorboard or tr.wandb or tr.mlflow):
        return Tracker()
    if tr.mlflow:
        _mlflow_uri(cfg, run_dir)  # refuse the default file store for a remote run dir before touching anything
    if tr.wandb and tr.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("tracking.wandb_mode=online needs WANDB_API_KEY in the environment of the training "
                          "workers (or use tracking.wandb_mode=offline)")
    if "://" not in run_dir:
        os.makedirs(run_dir, exist_ok=True)
    _remove_stale_staging()
    state = _read_state(run_dir) if (tr.wandb or tr.mlflow) else {}
    backends: list[_Backend] = []
    try:
        if tr.tensorboard:
            backends.append(_TensorBoard(run_dir, resume_step, tr.upload_every_s))
        if tr.mlflow:
            backends.append(_Mlflow(cfg, run_dir, resume_step, state))
        if tr.wandb:
            backends.append(_Wandb(cfg, run_dir, resume_step, state))
    except BaseException:
        Tracker(backends).close()
        raise
    return Tracker(backends)
