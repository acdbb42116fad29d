"""The SUNDAE objective (``sundae_loss``) and the draws of ``noise.py``: gradients through every
unrolled step, detached temperature-1 samples between steps, equal step weights, categorical
draws at a temperature, corruption-rate, class-dropout and region statistics, and every
ValueError.

Fake priors (``conftest.FakePrior``) make the logits a known function of the input, so expected
values are computed by hand; the real ``SundaePrior`` ("tiny" preset) covers the gradient path.
Golden values for fixed seeds: test_loss_golden.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib import corrupt_tokens, sundae_loss
from comfyui_sundae.sundae_lib.noise import sample_categorical
from conftest import FakePrior, ShiftPrior, gen, tiny_prior
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------


def test_loss_gradients_reach_the_parameters():
    prior = tiny_prior(num_classes=3)
    tokens = torch.randint(0, 16, (4, 8, 8), generator=gen())
    loss = sundae_loss(prior, tokens, torch.tensor([0, 1, 2, 0]), generator=gen(1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in prior.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    nonzero = [n for n, g in grads.items() if g.abs().sum() > 0]
    assert len(nonzero) >= 0.9 * len(grads)
    assert grads["token_emb.weight"].abs().sum() > 0 and grads["to_logits.weight"].abs().sum() > 0


def test_loss_unroll_chains_detached_samples():
    k = 8
    prior = ShiftPrior(shift=3, k=k)
    tokens = torch.randint(0, k, (4, 8, 8), generator=gen())
    sundae_loss(prior, tokens, unroll_steps=3, generator=gen(2))
    assert len(prior.calls) == 3
    x0, x1, x2 = (c["tokens"] for c in prior.calls)
    assert torch.equal(x1, (x0 + 3) % k) and torch.equal(x2, (x1 + 3) % k)  # sampled from logits
    assert all(
        c["tokens"].dtype == torch.int64 and not c["tokens"].requires_grad for c in prior.calls
    )
    assert [c["grad"] for c in prior.calls] == [True] * 3  # each forward builds a graph


class FlatPrior(FakePrior):
    """Learnable logits ``table * (call index + 1)``, the same at every position."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.table = nn.Parameter(torch.randn(self.codebook_size, generator=gen(4)) * 0.1)

    def logits_fn(self, tokens, labels):
        scale = len(self.calls)  # 1 for the first forward, 2 for the second
        return (self.table * scale).expand(*tokens.shape, self.codebook_size)


def test_loss_equal_step_weights_and_temperature_one_sampling():
    k = 6
    prior = FlatPrior(k=k, grid=(32, 32))
    tokens = torch.randint(0, k, (8, 32, 32), generator=gen())
    loss, metrics = sundae_loss(prior, tokens, generator=gen(3), return_metrics=True)
    with torch.no_grad():
        flat = tokens.reshape(-1)
        ce = [F.cross_entropy((prior.table * s).expand(flat.numel(), k), flat) for s in (1, 2)]
        acc = (flat == prior.table.argmax()).float().mean()
    assert loss.item() == pytest.approx(((ce[0] + ce[1]) / 2).item(), rel=1e-5)
    assert metrics["loss_per_step"].tolist() == pytest.approx([c.item() for c in ce], rel=1e-5)
    assert metrics["accuracy"].item() == pytest.approx(acc.item(), abs=1e-6)
    loss.backward()
    assert prior.table.grad.abs().sum() > 0
    # the second input is a temperature-1 sample of near-flat logits: about uniform, not argmax
    freq = torch.bincount(prior.calls[1]["tokens"].reshape(-1), minlength=k).float() / flat.numel()
    assert torch.allclose(freq, torch.softmax(prior.table.detach(), 0), atol=0.02)


def test_sample_categorical_matches_softmax_at_temperature():
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, float("-inf")]).expand(100_000, 5)
    draws = sample_categorical(logits, 0.5, gen(1))
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    expected = torch.softmax(torch.tensor([0.0, 1.0, -1.0, 2.0, float("-inf")]) / 0.5, 0)
    assert torch.allclose(freq, expected, atol=0.005)
    assert freq[4] == 0  # zero probability is never drawn
    # bf16 logits are sampled in fp32 and give the same draws as their fp32 copy
    lb = torch.randn(64, 37, generator=gen(2)).bfloat16()
    assert torch.equal(
        sample_categorical(lb, 0.7, gen(3)), sample_categorical(lb.float(), 0.7, gen(3))
    )


def test_corrupt_tokens_statistics():
    k = 4
    tokens = torch.zeros(3, 100, 100, dtype=torch.long)
    out = corrupt_tokens(tokens, torch.tensor([0.0, 0.5, 1.0]), k, generator=gen())
    frac = (out != tokens).float().mean(dim=(1, 2))
    assert frac[0] == 0
    assert frac[1].item() == pytest.approx(0.5 * (1 - 1 / k), abs=0.015)
    assert frac[2].item() == pytest.approx(1 - 1 / k, abs=0.015)
    hist = torch.bincount(out[2].reshape(-1), minlength=k).float() / 10_000
    assert torch.allclose(hist, torch.full((k,), 1 / k), atol=0.015)  # uniform over the vocab
    assert torch.equal(out, corrupt_tokens(tokens, torch.tensor([0.0, 0.5, 1.0]), k, gen()))


def test_loss_corruption_rate_is_uniform_per_sample():
    k = 16
    prior = ShiftPrior(shift=0, k=k)
    tokens = torch.zeros(600, 16, 16, dtype=torch.long)
    sundae_loss(prior, tokens, unroll_steps=1, generator=gen(5))
    frac = (prior.calls[0]["tokens"] != 0).float().mean(dim=(1, 2)) / (1 - 1 / k)  # ~ t ~ U(0,1)
    assert frac.mean().item() == pytest.approx(0.5, abs=0.04)
    assert (frac < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.06)
    assert (frac > 0.75).float().mean().item() == pytest.approx(0.25, abs=0.06)


def test_loss_class_dropout_rates():
    prior = ShiftPrior(shift=0, num_classes=5, class_dropout=0.1)
    tokens = torch.zeros(4000, 1, 1, dtype=torch.long)
    labels = torch.full((4000,), 3)
    for dropout, expected in ((0.3, 0.3), (None, 0.1), (0.0, 0.0)):  # None: prior.config
        prior.calls.clear()
        sundae_loss(prior, tokens, labels, unroll_steps=1, class_dropout=dropout, generator=gen())
        seen = prior.calls[0]["labels"]
        assert set(seen.tolist()) <= {3, -1}
        assert (seen == -1).float().mean().item() == pytest.approx(expected, abs=0.025)
    uncond = ShiftPrior(shift=0)
    sundae_loss(uncond, tokens[:8], unroll_steps=1, generator=gen())
    assert uncond.calls[0]["labels"] is None


def test_random_regions_are_rectangles_or_their_complements():
    from comfyui_sundae.sundae_lib.loss import random_regions

    h, w = 12, 20
    regions = random_regions(3000, (h, w), gen(6), torch.device("cpu"))
    assert regions.shape == (3000, h, w) and regions.dtype == torch.bool
    assert regions.flatten(1).any(1).all()  # never empty
    assert torch.equal(regions, random_regions(3000, (h, w), gen(6), torch.device("cpu")))
    n_rect = 0
    for r in regions[:300]:
        # a rectangle, or the complement of one: the rows / columns it touches span a box that
        # it fills exactly
        for cand, is_rect in ((r, True), (~r, False)):
            rows = cand.any(1).nonzero().flatten()
            cols = cand.any(0).nonzero().flatten()
            if len(rows) == 0:
                continue
            box = torch.zeros_like(cand)
            box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
            if torch.equal(box, cand):
                n_rect += is_rect
                break
        else:
            raise AssertionError(f"not a rectangle or a complement of one:\n{r.int()}")
    assert 100 < n_rect < 200  # half rectangles, half complements (binomial, sd ~9)
    cover = regions.float().mean(dim=(1, 2))
    assert cover.mean().item() == pytest.approx(0.5, abs=0.03)
    assert (cover > 0.9).any() and (cover < 0.05).any()  # whole-grid-ish and tiny regions occur


def test_loss_region_corruption_keeps_the_outside_clean_through_the_unroll(monkeypatch):
    from comfyui_sundae.sundae_lib import loss as loss_mod

    k, b = 16, 64
    bottom = torch.zeros(b, 8, 8, dtype=torch.bool)
    bottom[:, 4:] = True
    monkeypatch.setattr(loss_mod, "random_regions", lambda n, grid, g, d: bottom[:n])
    prior = ShiftPrior(shift=5, k=k)  # proposes every token shifted: the unroll changes all
    tokens = torch.randint(0, k, (b, 8, 8), generator=gen())
    sundae_loss(prior, tokens, unroll_steps=3, region_corruption=1.0, generator=gen(7))
    for call in prior.calls:
        assert torch.equal(call["tokens"][:, :4], tokens[:, :4])  # the outside: always clean
    x0, x1, x2 = (c["tokens"] for c in prior.calls)
    assert (x0[:, 4:] != tokens[:, 4:]).any()  # corrupted inside
    assert torch.equal(x1[:, 4:], (x0[:, 4:] + 5) % k) and torch.equal(
        x2[:, 4:], (x1[:, 4:] + 5) % k
    )

    # with probability 0.5 per sample: about half the samples are regional, the rest corrupted
    # everywhere (their top half changes too, at their rate)
    prior.calls.clear()
    tokens = torch.zeros(2000, 8, 8, dtype=torch.long)
    monkeypatch.setattr(
        loss_mod, "random_regions", lambda n, grid, g, d: bottom[:1].expand(n, 8, 8)
    )
    sundae_loss(prior, tokens, unroll_steps=1, region_corruption=0.5, generator=gen(8))
    top_changed = (prior.calls[0]["tokens"][:, :4] != 0).any(dim=(1, 2)).float().mean().item()
    # a plain sample's top half (32 tokens at rate t ~ U(0,1)) stays clean with probability
    # E[(1 - 15t/16)^32] ~ 0.033, so ~0.5 * 0.967 of the samples change there
    assert top_changed == pytest.approx(0.5 * 0.967, abs=0.04)


def test_loss_region_corruption_zero_is_plain_sundae():
    prior = ShiftPrior(shift=3, k=6)
    tokens = torch.randint(0, 6, (8, 8, 8), generator=gen())
    a = sundae_loss(prior, tokens, generator=gen(3))
    b = sundae_loss(prior, tokens, region_corruption=0.0, generator=gen(3))
    assert torch.equal(prior.calls[0]["tokens"], prior.calls[2]["tokens"])  # same random stream
    assert torch.equal(prior.calls[1]["tokens"], prior.calls[3]["tokens"])
    assert a.item() == b.item()
    with pytest.raises(ValueError, match=r"region_corruption must lie in \[0, 1\]"):
        sundae_loss(prior, tokens, region_corruption=1.5)


# --------------------------------------------------------------------------------------------
# errors that teach
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, kwargs, match",
    [
        (torch.zeros(2, 8, 8), {}, "integer codebook indices"),
        (torch.full((2, 8, 8), 16), {}, r"must lie in \[0, 16\)"),
        (torch.zeros(8, 8, dtype=torch.long), {}, r"shape \[b, h, w\]"),
        (torch.zeros(2, 8, 8, dtype=torch.long), dict(unroll_steps=0), "unroll_steps"),
        (torch.zeros(2, 8, 8, dtype=torch.long), dict(labels=1), "this prior is unconditional"),
    ],
)
def test_loss_value_errors(tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sundae_loss(ShiftPrior(shift=0), tokens, **kwargs)


def test_loss_class_dropout_errors():
    tokens = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"class_dropout must lie in \[0, 1\]"):
        sundae_loss(ShiftPrior(num_classes=3), tokens, 1, class_dropout=1.5)
    with pytest.raises(ValueError, match="needs a prior with a null class"):
        sundae_loss(ShiftPrior(num_classes=3, null_class=False), tokens, 1, class_dropout=0.2)
