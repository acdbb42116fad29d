"""Shared pytest fixtures and small-model builders.

Fixtures: the repository root, the real MNIST digits shipped in ``data/``, fp32 as ``auto`` on
CPU and seed 0 before every test, and ``one_thread`` (a module opts in with
``pytestmark = pytest.mark.usefixtures("one_thread")``).

Builders (import them: ``from conftest import tiny_prior, small_vqgan``): the tiny SUNDAE prior
and the narrow f4 VQ-GAN that the test modules build their cases from, ``gen(seed)``, and
``FakePrior`` / ``ShiftPrior``: test doubles of the prior contract whose logits are a known
function of the input (the sampler and objective tests).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib import VQGAN, PriorConfig, SundaePrior, VQGANConfig
from torch import nn

REPO = Path(__file__).resolve().parents[1]
MNIST_PATH = REPO / "data" / "mnist_5k.npz"
CPU = torch.device("cpu")
TWO_LEVELS = (1, (1, 1, 1), 1)  # a tiny prior depth with two nested hourglass levels
PEAK = 100.0  # logit gap that makes a fake prior's proposal certain (exp(-100) ~ 4e-44)
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


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


class FakePrior(nn.Module):
    """Implements the prior contract (attributes + ``forward(tokens, labels) -> logits``) with
    logits from ``self.logits_fn``; records every forward call."""

    def __init__(self, k=16, grid=(8, 8), num_classes=0, null_class=True, class_dropout=0.1):
        super().__init__()
        self.config = SimpleNamespace(
            codebook_size=k,
            grid=grid,
            num_classes=num_classes,
            null_class=null_class,
            class_dropout=class_dropout,
        )
        self.codebook_size = k
        self.num_classes = num_classes
        self.has_null_class = num_classes > 0 and null_class
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls: list[dict] = []

    def logits_fn(self, tokens, labels):
        raise NotImplementedError

    def forward(self, tokens, labels=None):
        self.calls.append(
            dict(
                tokens=tokens.clone(),
                labels=None if labels is None else labels.clone(),
                training=self.training,
                grad=torch.is_grad_enabled(),
            )
        )
        return self.logits_fn(tokens, labels) + self.anchor


class ShiftPrior(FakePrior):
    """Proposes ``(x + shift) mod k`` with certainty (shift 0 = a converged model)."""

    def __init__(self, shift=1, **kw):
        super().__init__(**kw)
        self.shift = shift

    def logits_fn(self, tokens, labels):
        return F.one_hot((tokens + self.shift) % self.codebook_size, self.codebook_size) * PEAK


def run_sampler(prior, **inputs):
    """The SUNDAE Sampler node's ``run`` on a ``PriorHandle`` with small test settings (seed 0,
    4 steps, no early stop, one image at the trained size), any input overridden by keyword;
    returns its ``TokenBatch``."""
    from comfyui_sundae.nodes import NODE_CLASS_MAPPINGS

    args = dict(seed=0, steps=4, temperature_start=1.0, temperature_end=0.7, update_start=1.0,
                update_end=1.0, early_stop=False, batch_size=1, class_label=-1, cfg_scale=1.0,
                strength=1.0, width=0, height=0)
    args.update(inputs)
    with torch.inference_mode():
        return NODE_CLASS_MAPPINGS["SundaeSampler"]().run(prior, **args)[0]


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init is too tame (zero biases, unit norms): perturb every tensor so each key
    matters for the outputs (the VQ-GAN loading tests compare converted weights through them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


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
