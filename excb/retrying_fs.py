"""A pyarrow filesystem for reading training data from object storage that waits out short outages.

Every filesystem call (listing, file info, opening a file) that fails with a transient network error is retried
up to ``attempts`` times in all, with waits of 1, 2, 4, ... seconds (at most ``max_wait_s``) between tries. When
the last try fails, an :class:`OSError` names the object and the number of tries; its text carries none of the
AWS error codes Ray Data retries on by itself, so the failure is not retried again on top (Ray Data's own policy
is 10 tries with waits of up to 32 s, about 2.5 minutes per file). Other errors (a missing key, access denied)
are raised at once.

Reads from an already opened file are not retried here (a stream cut in the middle of a file surfaces as
pyarrow's error, which Ray Data's task retries handle).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

import pyarrow.fs as pafs
from ray.data._internal.util import (  # pinned ray==2.60.0
    RetryingPyFileSystem,
    RetryingPyFileSystemHandler,
)

T = TypeVar("T")

# Substrings of pyarrow / AWS SDK messages of failures that may pass: the endpoint does not answer, times out,
# or asks to slow down.
TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Connection refused", "timed out",
                     "Timeout", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "HTTP status 503",
                     "HTTP status 500", "Connection reset")


class StorageUnreachableError(OSError):
    """Object storage did not answer within the tries; the message names the object."""


def is_transient(error: BaseException) -> bool:
    """True for an error of the kinds in :data:`TRANSIENT_MARKERS` (not for a missing key, a denied access, or
    a :class:`StorageUnreachableError` that already used up its tries)."""
    if not isinstance(error, OSError) or isinstance(error, StorageUnreachableError):
        return False
    return any(m in str(error) for m in TRANSIENT_MARKERS)


class RetryingHandler(RetryingPyFileSystemHandler):
    """Ray Data's retrying filesystem handler with excb's policy: ``attempts`` tries in all, waits of 1, 2, 4, ...
    s (at most ``max_wait_s``), only for :func:`is_transient` errors, and a :class:`StorageUnreachableError` naming
    the object at the end. Wrapped in Ray's ``RetryingPyFileSystem`` (see :func:`retrying`), so Ray Data sees the
    S3 filesystem inside (its scheme checks unwrap it) and does not wrap it again."""

    def __init__(self, base: pafs.FileSystem, attempts: int = 3, max_wait_s: float = 8.0, scheme: str = "s3") -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        super().__init__(base, retryable_errors=list(TRANSIENT_MARKERS), max_attempts=attempts,
                         max_backoff_s=int(max_wait_s))
        self.attempts, self.max_wait_s, self.scheme = attempts, max_wait_s, scheme

    def _retry_operation(self, operation: Callable[[], T], description: str) -> T:
        t0 = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except OSError as e:
                if not is_transient(e):
                    raise
                if attempt == self.attempts:
                    reason = str(e).splitlines()[0][:300].replace("AWS Error", "error")
                    raise StorageUnreachableError(
                        f"object storage unreachable: could not {_with_scheme(description, self.scheme)} after "
                        f"{self.attempts} tries over {time.monotonic() - t0:.0f}s (storage.read_retries); last "
                        f"error: {reason}") from None
                time.sleep(min(2 ** (attempt - 1), self.max_wait_s) * random.uniform(0.8, 1.2))
        raise AssertionError("unreachable")


def _with_scheme(description: str, scheme: str) -> str:
    """Ray's description of the operation (``open input file bucket/key``, ``get file info for ['bucket/key']``)
    with the object as a URI."""
    m = re.fullmatch(r"(.*?) \[?'?([^\]'\s<>]+)'?\]?", description)
    return f"{m.group(1)} {scheme}://{m.group(2)}" if m else description


def retrying(base: pafs.FileSystem, attempts: int, scheme: str = "s3") -> pafs.FileSystem:
    """``base`` behind a :class:`RetryingHandler`, as Ray Data's ``RetryingPyFileSystem``."""
    return RetryingPyFileSystem(RetryingHandler(base, attempts=attempts, scheme=scheme))
