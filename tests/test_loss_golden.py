"""Golden values: ``sundae_loss`` for fixed seeds, every argument given.

A regression guard for refactors of the objective (where its noise comes from, how it validates,
how it calls the prior): the loss, its per-step values, the accuracy, the mean corruption rate
and the norm of the gradient were recorded once from ``main`` and stored in
``tests/golden/sundae_loss.npz``. The corruption rate is pure generator output and must match
exactly; the float results must match to a few ulp of float32 (an exact match on the machine that
recorded them; the tolerance only absorbs another CPU's matmul rounding). A change in what the
objective draws from the generator, or in what it computes, moves them by far more.

If a deliberate change moves the numbers, re-record with
``python tests/test_loss_golden.py --record`` and say why in the commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_sundae.sundae_lib import (
    PixelCodec,
    PriorConfig,
    SundaePrior,
    load_prior,
    load_vqgan,
    sundae_loss,
)

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden" / "sundae_loss.npz"
MNIST = TESTS.parent / "data" / "mnist_5k.npz"

# name -> (prior, keyword arguments of sundae_loss); "seed" seeds the loss generator. The tiny
# random priors see random tokens; the shipped priors see real MNIST digits (the first "batch" of
# data/mnist_5k.npz) through their codecs, so their losses are those of a trained model
CASES: dict[str, tuple[str, dict]] = {
    "tiny_uncond": ("tiny", dict(
        batch=3, labels=None, unroll_steps=2, class_dropout=None, region_corruption=0.0, seed=21)),
    "tiny_cond_regions": ("tiny-cond", dict(
        batch=4, labels=[0, 1, 2, -1], unroll_steps=3, class_dropout=0.5, region_corruption=0.7,
        seed=22)),
    "vq_default_dropout": ("mnist-vq", dict(
        batch=4, labels=[3, 1, 4, 1], unroll_steps=2, class_dropout=None, region_corruption=0.0,
        seed=23)),
    "pixels_regions": ("mnist-pixels", dict(
        batch=2, labels=[5, -1], unroll_steps=2, class_dropout=0.0, region_corruption=1.0, seed=24)),
}
KEYS = ("loss", "loss_per_step", "accuracy", "rate", "grad_norm")


def _prior(name: str) -> SundaePrior:
    if name.startswith("tiny"):
        torch.manual_seed(0)
        extra = dict(num_classes=3) if name == "tiny-cond" else {}
        return SundaePrior(PriorConfig.preset("tiny", **extra))
    return load_prior(name)


def _tokens(name: str, prior: SundaePrior, batch: int) -> torch.Tensor:
    if name.startswith("tiny"):
        h, w = prior.config.grid
        return torch.randint(0, prior.config.codebook_size, (batch, h, w),
                             generator=torch.Generator().manual_seed(7))
    with np.load(MNIST) as data:
        digits = torch.from_numpy(data["images"][:batch]).float()[:, None] / 127.5 - 1
    codec = PixelCodec(16, 1) if name == "mnist-pixels" else load_vqgan("mnist-vq-f4")
    with torch.no_grad():
        return codec.encode(digits)


def _run(name: str, kwargs: dict) -> dict[str, np.ndarray]:
    kwargs = dict(kwargs)
    prior = _prior(name).train()
    tokens = _tokens(name, prior, kwargs.pop("batch"))
    labels = kwargs.pop("labels")
    generator = torch.Generator().manual_seed(kwargs.pop("seed"))
    loss, metrics = sundae_loss(prior, tokens, labels, generator=generator, return_metrics=True,
                                **kwargs)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in prior.parameters() if p.grad is not None])
    out = {"loss": loss, "grad_norm": grads.norm(), **metrics}
    return {k: out[k].detach().double().numpy() for k in KEYS}


def _record() -> None:
    torch.set_num_threads(1)
    out = {}
    for case, (name, kwargs) in CASES.items():
        for key, value in _run(name, kwargs).items():
            out[f"{case}/{key}"] = value
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **out)
    print(f"wrote {GOLDEN}: {len(out)} arrays")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_golden_file_covers_every_case(golden):
    assert sorted(golden) == sorted(f"{c}/{k}" for c in CASES for k in KEYS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sundae_loss_unchanged(case, golden):
    name, kwargs = CASES[case]
    got = _run(name, kwargs)
    assert np.array_equal(got["rate"], golden[f"{case}/rate"]), f"{case}: corruption rates moved"
    for key in ("loss", "loss_per_step", "accuracy", "grad_norm"):
        np.testing.assert_allclose(got[key], golden[f"{case}/{key}"], rtol=1e-6, atol=0,
                                   err_msg=f"{case}: {key} differs from the recorded value")


def test_golden_cases_are_not_degenerate(golden):
    """The recorded values are real losses: near log(k) for the random tiny prior, clearly below
    it for the trained shipped ones on real digits; every step's loss is recorded."""
    assert golden["tiny_uncond/loss"] == pytest.approx(np.log(16), rel=0.2)
    assert golden["vq_default_dropout/loss"] < 0.8 * np.log(256)
    assert golden["pixels_regions/loss"] < 0.8 * np.log(16)
    assert golden["tiny_cond_regions/loss_per_step"].shape == (3,)
    assert 0 < golden["pixels_regions/rate"] < 1


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_loss_golden.py --record")
    _record()
