"""Fixtures shared by every test module.

Tests marked ``ray`` use one local Ray instance for the whole session (starting Ray costs seconds). Only one Ray
instance may run on a machine at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local 2-CPU Ray instance shared by the session, shut down at the end."""
    import ray

    if ray.is_initialized():  # pragma: no cover - something else left one running
        ray.shutdown()
    ray.init(num_cpus=2, logging_level=logging.WARNING)  # the dashboard serves the State API Train needs
    try:
        yield
    finally:
        ray.shutdown()
