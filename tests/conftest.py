"""Shared pytest fixtures and small-model builders.

Fixtures: the repository root, the real MNIST digits shipped in ``data/``, fp32 as ``auto`` on
CPU and seed 0 before every test, and ``one_thread`` (a module opts in with
``pytestmark = pytest.mark.usefixtures("one_thread")``).

Builders (import them: ``from conftest import tiny_prior, small_vqgan``): the tiny SUNDAE prior
and the narrow f4 VQ-GAN that the test modules build their cases from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_sundae.sundae_lib import VQGAN, PriorConfig, SundaePrior, VQGANConfig

REPO = Path(__file__).resolve().parents[1]
MNIST_PATH = REPO / "data" / "mnist_5k.npz"
CPU = torch.device("cpu")
# the mnist-f4 VQ-GAN narrowed to 8 channels: factor 4, 256 codes, grey; ~65k parameters
SMALL_VQ = dict(ch=8, z_channels=8, embed_dim=8, norm_groups=4)


def tiny_prior(*, seed: int | None = 0, **overrides) -> SundaePrior:
    """``SundaePrior(PriorConfig.preset("tiny", **overrides))`` in eval mode: 16 codes, an 8×8
    trained grid, width 32, 2 heads, depth (1, 1, 1); ~50k parameters. Built right after
    ``torch.manual_seed(seed)`` (``seed=None``: from the current RNG state)."""
    if seed is not None:
        torch.manual_seed(seed)
    return SundaePrior(PriorConfig.preset("tiny", **overrides)).eval()


def small_vqgan(*, seed: int | None = 0, **overrides) -> VQGAN:
    """``VQGAN(VQGANConfig.preset("mnist-f4", **SMALL_VQ, **overrides))`` in eval mode (random
    weights), built right after ``torch.manual_seed(seed)`` (``seed=None``: the current RNG
    state)."""
    if seed is not None:
        torch.manual_seed(seed)
    return VQGAN(VQGANConfig.preset("mnist-f4", **{**SMALL_VQ, **overrides})).eval()


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


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread: tiny models gain nothing from intra-op threads,
    and on a shared 2-core machine the thread barriers cost more than the maths (stable timings
    too). Module-scoped, so the module's own module-scoped fixtures are built on one thread as
    well; the previous count is restored for the next module. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
