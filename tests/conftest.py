"""Shared pytest fixtures: the repository root and the real MNIST digits shipped in data/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MNIST_PATH = REPO / "data" / "mnist_5k.npz"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST digits: (images uint8 [5000, 28, 28], labels int64 [5000])."""
    data = np.load(MNIST_PATH)
    return data["images"], data["labels"].astype(np.int64)


@pytest.fixture(autouse=True)
def _cpu_dtype_fp32(monkeypatch):
    """``auto`` precision = fp32 on CPU in every test, whatever this CPU's bf16 speed: results
    must not depend on the machine (test_dtype.py clears it to test the choice itself)."""
    monkeypatch.setenv("SUNDAE_CPU_DTYPE", "fp32")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (stable timings and results on a shared 2-core machine);
    use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
