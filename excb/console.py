"""The one console logger of excb: every progress line, from the driver and from Ray workers, as ``[excb] ...``.

``info(message)`` writes one line to the process's standard output at the moment of the call (``sys.stdout``, so
output captured by a caller or a test is respected); in a Ray Train worker, :func:`use_real_stdout` sends it to
the worker's real stdout instead, which Ray forwards to the driver once (Ray Train's patched ``print`` would also
copy it through its logger, so every line would show twice). Errors go to ``sys.stderr``. Warnings stay on the
modules' own ``logging`` loggers (``excb.data.shards``, ``excb.rundir.checkpoint``, ...), where applications and
tests can filter and capture them.

Verbosity: by default ``excb pretrain | sweep | bench`` hide what Ray and the libraries print for themselves (Ray
Train's per-report ``TrainingReport(...)`` lines, Ray Data's execution and progress lines, deprecation and future
warnings); ``--verbose`` shows them (:func:`set_verbose`, read through :func:`is_verbose`, which falls back to
the ``EXCB_VERBOSE`` environment variable that :func:`excb.run.startup.init_ray` hands to every Ray worker of the
job). The Ray side of it lives in :mod:`excb.run.startup`; :func:`quiet_ray_worker` is the job's
``worker_process_setup_hook``, so this module stays free of heavy imports.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

PREFIX = "[excb]"
VERBOSE_ENV = "EXCB_VERBOSE"
# Library warnings hidden unless verbose; subclasses (Ray's RayDeprecationWarning) included.
HIDDEN_WARNINGS: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# Ray Data's progress-UI notices ("Progress bars disabled. To enable ...", "A new progress UI is available"), which
# the progress bars switched off by excb.run.startup would otherwise announce once per process.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# Ray Train modules whose logger is named by the module's file path (``logging.getLogger(__file__)``), outside
# ``ray.train``, so Ray Train's LoggingConfig does not reach them: context.py logs "Reporting training result N:
# TrainingReport(checkpoint=..., metrics={...whole dict...})" for every report at INFO through the root logger.
RAY_TRAIN_FILE_LOGGERS = ("train/v2/_internal/execution/context.py", "train/collective/collectives.py")
_logger = logging.getLogger("excb.console")


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stdout`` (or ``sys.__stdout__``) is when a record is emitted."""

    real = False

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.__stdout__ if self.real else (sys.stderr if record.levelno >= logging.ERROR
                                                        else sys.stdout)
        super().emit(record)
        self.flush()


_handler = _StdoutHandler()
_handler.setFormatter(logging.Formatter(f"{PREFIX} %(message)s"))
_logger.addHandler(_handler)
_logger.setLevel(logging.INFO)
_logger.propagate = False


def use_real_stdout() -> None:
    """Send this process's lines to its real stdout (Ray Train workers; see the module docstring)."""
    _handler.real = True


def info(message: str) -> None:
    """One progress line: ``[excb] message``."""
    _logger.info(message)


def error(message: str) -> None:
    """One error line on stderr: ``[excb] message``."""
    _logger.error(message)


_verbose: bool | None = None


def set_verbose(on: bool | None) -> bool | None:
    """Show (True) or hide (False) Ray's and the libraries' own output in this process; None: back to
    ``EXCB_VERBOSE``. Returns the previous setting, for a caller that restores it."""
    global _verbose
    previous, _verbose = _verbose, on
    return previous


def is_verbose() -> bool:
    """:func:`set_verbose`'s setting, or else ``EXCB_VERBOSE`` (set and not ``0``)."""
    if _verbose is not None:
        return _verbose
    return os.environ.get(VERBOSE_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def hide_library_warnings() -> None:
    """Ignore :data:`HIDDEN_WARNINGS` in this process. The filters go to the front of the list, so call this
    after ``import ray`` (which puts its own "show once per module" filter for RayDeprecationWarning there);
    calling it again moves them back to the front. Other warnings (UserWarning, RuntimeWarning, ...) stay."""
    for category in reversed(HIDDEN_WARNINGS):
        warnings.filterwarnings("ignore", category=category)


def quiet_ray_worker() -> None:
    """The Ray job's ``worker_process_setup_hook`` when not verbose (see :func:`excb.run.startup.init_ray`): runs
    in every Ray worker process after Ray is imported, before any task or actor code."""
    hide_library_warnings()
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "__file__", None):
        root = os.path.dirname(ray.__file__)
        for relative in RAY_TRAIN_FILE_LOGGERS:
            logging.getLogger(os.path.join(root, *relative.split("/"))).setLevel(logging.WARNING)
