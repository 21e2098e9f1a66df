"""The one console logger of excb: every progress line, from the driver and from Ray workers, as ``[excb] ...``.

``info(message)`` writes one line to the process's standard output at the moment of the call (``sys.stdout``, so
output captured by a caller or a test is respected); in a Ray Train worker, :func:`use_real_stdout` sends it to
the worker's real stdout instead, which Ray forwards to the driver once (Ray Train's patched ``print`` would also
copy it through its logger, so every line would show twice). Errors go to ``sys.stderr``. Warnings stay on the
modules' own ``logging`` loggers (``excb.data.shards``, ``excb.rundir.checkpoint``, ...), where applications and
tests can filter and capture them.
"""

from __future__ import annotations

import logging
import sys

PREFIX = "[excb]"
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
