"""Shared fixtures for the excb.data tests (real Fashion-MNIST files, real pyarrow/Ray).

Tests marked ``ray`` start a local Ray instance. Only one Ray instance may run
on the development machine at a time, so run pytest as
``flock /tmp/excb-ray.lock .venv/bin/python -m pytest tests/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from excb.data import load_fashion_mnist, prepare_fashion_mnist
from excb.data.fashion_mnist import SYSTEM_DIR

PREPARED_LIMIT = 300
PREPARED_ROWS_PER_SHARD = 128


def _fashion_dir() -> Path:
    env = os.environ.get("EXCB_FASHION_MNIST_DIR")
    folder = Path(env) if env else Path(SYSTEM_DIR)
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {folder} (apt-get install dataset-fashion-mnist)")
    return folder


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """Folder holding the real Fashion-MNIST IDX files."""
    return _fashion_dir()


@pytest.fixture(scope="session")
def fashion_test(fashion_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real Fashion-MNIST test split (10k images, labels)."""
    return load_fashion_mnist("test", root=str(fashion_dir))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path) -> str:
    """A Fashion-MNIST shard set with 300 rows per split in 128-row shards (read-only!)."""
    dest = tmp_path_factory.mktemp("prepared") / "fm"
    prepare_fashion_mnist(
        str(dest), limit=PREPARED_LIMIT, rows_per_shard=PREPARED_ROWS_PER_SHARD, root=str(fashion_dir)
    )
    return str(dest)


@pytest.fixture(scope="session")
def prepared_rows() -> int:
    """Rows per split in :func:`prepared`."""
    return PREPARED_LIMIT
