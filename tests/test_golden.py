"""Golden tokens: ``sample()`` on the three shipped priors, fixed seeds, every argument given.

A regression guard for refactors: the token grids were recorded once from ``main`` and stored in
``tests/golden/sample_tokens.npz``; any change to what ``sample()`` draws for a fixed seed fails
here. Every argument is passed explicitly, so changing a *default* (e.g. the recorded settings
taking over) does not move these tokens; changing the arithmetic does.

One torch thread and fp32 (the conftest fixture) keep the results independent of the core count.
If a deliberate change moves the numbers (a new attention kernel, say), re-record with
``python tests/test_golden.py --record`` and say why in the commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_sundae.sundae_lib import load_prior, sample

GOLDEN = Path(__file__).resolve().parent / "golden" / "sample_tokens.npz"

# name -> (prior, keyword arguments); generator seeds are part of the case
CASES: dict[str, tuple[str, dict]] = {
    "pixels_cfg3": ("mnist-pixels", dict(
        batch_size=2, steps=6, temperature=(1.0, 0.7), update_proportion=(1.0, 1.0),
        early_stop=False, min_steps=0, labels=[3, 7], cfg_scale=3.0, seed=11)),
    "vq_labels_earlystop": ("mnist-vq", dict(
        batch_size=3, steps=12, temperature=(0.9, 0.6), update_proportion=(1.0, 0.8),
        early_stop=True, min_steps=4, labels=[0, 5, -1], cfg_scale=1.0, seed=12)),
    "vq_cfg2": ("mnist-vq", dict(
        batch_size=2, steps=8, temperature=1.0, update_proportion=1.0,
        early_stop=False, min_steps=0, labels=[1, 8], cfg_scale=2.0, seed=13)),
    "emoji_cfg3": ("emoji", dict(
        batch_size=2, steps=6, temperature=(1.0, 0.7), update_proportion=(1.0, 1.0),
        early_stop=False, min_steps=0, labels=[0, 4], cfg_scale=3.0, seed=14)),
    "emoji_inpaint": ("emoji", dict(
        batch_size=2, steps=6, temperature=(1.0, 0.7), update_proportion=(1.0, 1.0),
        early_stop=False, min_steps=0, labels=[2], cfg_scale=3.0, seed=15,
        inpaint=True)),
    "vq_variation": ("mnist-vq", dict(
        batch_size=2, steps=10, temperature=(1.0, 0.7), update_proportion=(1.0, 1.0),
        early_stop=False, min_steps=0, labels=[4], cfg_scale=1.0, seed=16,
        strength=0.5)),
}


def _run(prior_name: str, kwargs: dict, priors: dict) -> np.ndarray:
    kwargs = dict(kwargs)
    prior = priors.setdefault(prior_name, load_prior(prior_name))
    generator = torch.Generator().manual_seed(kwargs.pop("seed"))
    h, w = prior.config.grid
    k = prior.config.codebook_size
    if kwargs.pop("inpaint", False):
        init = torch.Generator().manual_seed(99)
        kwargs["init_tokens"] = torch.randint(0, k, (1, h, w), generator=init)
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
        kwargs["mask"] = mask
        kwargs["strength"] = 1.0
    elif "strength" in kwargs:
        init = torch.Generator().manual_seed(98)
        kwargs["init_tokens"] = torch.randint(0, k, (1, h, w), generator=init)
        kwargs["mask"] = None
    else:
        kwargs.update(grid=(h, w), init_tokens=None, mask=None, strength=1.0)
    tokens = sample(prior, generator=generator, callback=None, check_interrupt=None, **kwargs)
    return tokens.numpy().astype(np.int16)


def _record() -> None:
    torch.set_num_threads(1)
    import os
    os.environ["SUNDAE_CPU_DTYPE"] = "fp32"
    priors: dict = {}
    out = {name: _run(p, kw, priors) for name, (p, kw) in CASES.items()}
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **out)
    print(f"wrote {GOLDEN}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def priors() -> dict:
    return {}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_golden_file_covers_every_case(golden):
    assert sorted(golden) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_tokens_unchanged(case, golden, priors):
    prior_name, kwargs = CASES[case]
    got = _run(prior_name, kwargs, priors)
    want = golden[case]
    assert got.shape == want.shape
    differ = int((got != want).sum())
    assert differ == 0, (
        f"{case}: {differ} of {want.size} tokens differ from the recorded golden tokens; "
        f"sample() changed behaviour for a fixed seed"
    )


def test_inpaint_case_keeps_unmasked_tokens(golden):
    """The recorded inpainting itself is sane: tokens outside the mask are the init tokens."""
    prior = load_prior("emoji")
    h, w = prior.config.grid
    init = torch.randint(0, prior.config.codebook_size, (1, h, w),
                         generator=torch.Generator().manual_seed(99)).numpy()
    keep = np.ones((h, w), dtype=bool)
    keep[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = False
    got = golden["emoji_inpaint"]
    assert (got[:, keep] == init[:, keep]).all()
    assert (got[:, ~keep] != init[:, ~keep]).mean() > 0.5


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    _record()
