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
