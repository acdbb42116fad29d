"""Sampler and objective: schedules, early stop with a shrinking batch (official bug B8 in
docs/official-code.md), inpainting invariants, variations, classifier-free guidance,
determinism, cancel, the unrolled loss (gradients, detached samples, equal weights), corruption
and class-dropout statistics, and every ValueError.

Most tests use small fake priors whose logits are a known function of the input, so expected
values are computed by hand; the real ``SundaePrior`` ("tiny" preset) covers the end-to-end paths.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib import (
    corrupt_tokens,
    sample,
    sundae_loss,
)
from comfyui_sundae.sundae_lib import sampler as sampler_mod
from comfyui_sundae.sundae_lib.noise import sample_categorical
from comfyui_sundae.sundae_lib.sampler import schedule
from conftest import tiny_prior
from torch import nn

PEAK = 100.0  # logit gap that makes a fake prior's proposal certain (exp(-100) ~ 4e-44)


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


class CountdownPrior(FakePrior):
    """Proposes ``max(x - 1, 0)``: a sample converges once all its free tokens reach 0, so
    samples freeze at different steps. Asserts that each sample arrives with its own label,
    which is stored in its (never regenerated) token at (0, 0)."""

    def logits_fn(self, tokens, labels):
        assert labels is not None and torch.equal(tokens[:, 0, 0], labels), "labels misaligned"
        return F.one_hot((tokens - 1).clamp(min=0), self.codebook_size) * PEAK


class TablePrior(FakePrior):
    """Logits = a fixed random table per label (row ``num_classes`` = null) + a per-position
    table: an elementwise function of the labels, independent of the batch composition."""

    def __init__(self, mix_scale=None, **kw):
        super().__init__(**kw)
        g = torch.Generator().manual_seed(123)
        h, w = self.config.grid
        self.class_table = torch.randn(self.num_classes + 1, self.codebook_size, generator=g)
        self.pos_table = torch.randn(h, w, self.codebook_size, generator=g)
        self.mix_scale = mix_scale  # reference CFG: mix inside the prior itself

    def _branch(self, labels):
        idx = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        return self.class_table[idx][:, None, None, :] + self.pos_table

    def logits_fn(self, tokens, labels):
        if self.mix_scale is None:
            return self._branch(labels)
        cond, uncond = self._branch(labels), self._branch(torch.full_like(labels, -1))
        return uncond + self.mix_scale * (cond - uncond)


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# schedules and categorical draws
# --------------------------------------------------------------------------------------------


def test_schedule_endpoints_and_single_step():
    assert schedule(1.0, 0.6, 5) == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    assert schedule(1.0, 0.7, 2) == [1.0, 0.7]
    assert schedule(0.8, 0.2, 1) == [0.8]
    assert schedule(0.5, 0.5, 3) == [0.5, 0.5, 0.5]


def test_sampler_uses_the_schedules(monkeypatch):
    """T reaches the categorical draw per step; p is the fraction of positions that take a
    proposal (ShiftPrior proposes a different token everywhere, so changed fraction = p)."""
    seen_t = []
    real = sampler_mod.sample_categorical

    def spy(logits, temperature, generator, **kw):
        seen_t.append(temperature)
        return real(logits, temperature, generator, **kw)

    monkeypatch.setattr(sampler_mod, "sample_categorical", spy)
    prior = ShiftPrior(shift=1, k=16, grid=(64, 64))
    frames = []
    sample(
        prior,
        batch_size=2,
        steps=3,
        temperature=(1.0, 0.5),
        update_proportion=(1.0, 0.2),
        early_stop=False,
        generator=gen(),
        callback=lambda s, t, x: frames.append(x.clone()),
    )
    assert seen_t == pytest.approx([1.0, 0.75, 0.5])
    first_input = prior.calls[0]["tokens"]
    changed = [(frames[0] != first_input).float().mean().item()]
    changed += [(frames[i] != frames[i - 1]).float().mean().item() for i in (1, 2)]
    # p = 1.0, 0.6, 0.2 over 8192 positions (std <= 0.006)
    assert changed == pytest.approx([1.0, 0.6, 0.2], abs=0.025)


def test_strength_runs_the_tail_of_the_schedule(monkeypatch):
    seen_t = []
    real = sampler_mod.sample_categorical
    monkeypatch.setattr(
        sampler_mod,
        "sample_categorical",
        lambda lg, t, g, **kw: seen_t.append(t) or real(lg, t, g, **kw),
    )
    init = torch.zeros(1, 8, 8, dtype=torch.long)
    sample(
        ShiftPrior(shift=0),
        init_tokens=init,
        strength=0.5,
        steps=4,
        temperature=(1.0, 0.4),
        early_stop=False,
        generator=gen(),
    )
    assert seen_t == pytest.approx([0.6, 0.4])  # last 2 of [1.0, 0.8, 0.6, 0.4]


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


# --------------------------------------------------------------------------------------------
# early stop, inpainting, variations
# --------------------------------------------------------------------------------------------


def test_early_stop_on_a_converged_model():
    prior = ShiftPrior(shift=0)  # every proposal equals the current token
    calls = []
    out = sample(
        prior,
        batch_size=3,
        steps=50,
        min_steps=4,
        generator=gen(),
        callback=lambda s, t, x: calls.append((s, t)),
    )
    # steps 0..3 always run; at step index 4 nothing changed -> all frozen -> stop
    assert calls == [(s, 50) for s in range(1, 6)]
    assert len(prior.calls) == 5
    assert out.shape == (3, 8, 8)
    prior.calls.clear()
    sample(prior, batch_size=3, steps=12, early_stop=False, generator=gen())
    assert len(prior.calls) == 12


def test_inpainting_with_shrinking_batch_keeps_unmasked_tokens():
    """Official bug B8: with batch > 1 and early stop, samples leave the batch; labels, masks and
    tokens must be indexed with the active subset. CountdownPrior asserts label alignment."""
    b, k = 5, 16
    init = torch.randint(0, k, (b, 8, 8), generator=gen(5))
    labels = torch.tensor([0, 1, 2, 3, 4])
    init[:, 0, 0] = labels  # the label lives in an unmasked token
    mask = torch.zeros(b, 8, 8, dtype=torch.bool)  # different masks, different hole sizes
    mask[0, 2:6, 1:7] = True
    mask[1, 7, 3] = True
    mask[2, 4:6, 4:6] = True
    mask[3, 1, 1:3] = True
    mask[4, 3:8, 2] = True
    prior = CountdownPrior(k=k, num_classes=5)
    frames = []
    out = sample(
        prior,
        init_tokens=init,
        mask=mask,
        labels=labels,
        steps=40,
        min_steps=0,
        update_proportion=1.0,
        generator=gen(6),
        callback=lambda s, t, x: frames.append(x.clone()),
    )
    assert torch.equal(out[~mask], init[~mask])  # bit-identical outside the mask
    for frame in frames:
        assert frame.shape == (b, 8, 8) and torch.equal(frame[~mask], init[~mask])
    assert (out[mask] == 0).all()  # every sample counted down to 0
    # sample i starts with hole maximum m_i and changes for m_i steps; the step with index m_i
    # changes nothing and freezes it, so step j runs on #{i : m_i >= j} samples
    start = prior.calls[0]["tokens"]
    highest = [int(start[i][mask[i]].max()) for i in range(b)]
    expected = [sum(m >= j for m in highest) for j in range(max(highest) + 1)]
    assert [c["tokens"].shape[0] for c in prior.calls] == expected
    assert len(set(expected)) > 2  # the batch really shrank, in several stages
    assert len(frames) == len(expected) < 40


def test_inpainting_bernoulli_updates_with_shrinking_batch():
    """p < 1: a sample freezes at the first step (>= min_steps) in which it did not change."""
    b = 4
    init = torch.randint(0, 16, (b, 8, 8), generator=gen(15))
    init[:, 0, 0] = torch.arange(b)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 2:4] = True
    prior = CountdownPrior(k=16, num_classes=b)
    out = sample(
        prior,
        init_tokens=init,
        mask=mask,
        labels=torch.arange(b),
        steps=60,
        min_steps=2,
        update_proportion=0.3,
        generator=gen(16),
    )
    assert torch.equal(out[:, ~mask], init[:, ~mask])
    sizes = [c["tokens"].shape[0] for c in prior.calls]
    assert sizes[:3] == [b] * 3 and sizes == sorted(sizes, reverse=True) and sizes[-1] < b


def test_inpainting_real_prior_batch_and_broadcast_mask():
    prior = tiny_prior(num_classes=3)
    init = torch.randint(0, 16, (1, 8, 8), generator=gen(7))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[3:7, 2:5] = True
    out = sample(
        prior,
        batch_size=4,
        init_tokens=init,
        mask=mask,
        labels=[0, 1, 2, -1],
        steps=30,
        min_steps=0,
        update_proportion=0.1,
        generator=gen(8),
    )
    assert out.shape == (4, 8, 8) and out.dtype == torch.int64
    assert torch.equal(out[:, ~mask], init[:, ~mask].expand(4, -1))
    assert (out[:, mask] != init[:, mask]).any()  # the hole really was regenerated


def test_empty_mask_returns_input_without_forward():
    prior = ShiftPrior(shift=1)
    init = torch.randint(0, 16, (2, 8, 8), generator=gen(9))
    calls = []
    out = sample(
        prior,
        init_tokens=init,
        mask=torch.zeros(2, 8, 8, dtype=torch.bool),
        callback=lambda *a: calls.append(a),
        generator=gen(),
    )
    assert torch.equal(out, init) and out.dtype == torch.int64
    assert prior.calls == [] and calls == []


def test_strength_corrupts_expected_fraction_and_runs_proportional_steps():
    k = 16
    init = torch.zeros(2, 64, 64, dtype=torch.long)
    prior = ShiftPrior(shift=0, k=k)
    sample(prior, init_tokens=init, strength=0.25, steps=20, early_stop=False, generator=gen())
    first = prior.calls[0]["tokens"]
    # replaced with prob. 0.25 by a uniform token (1/16 of which is 0 again): 0.25 * 15/16
    assert (first != 0).float().mean().item() == pytest.approx(0.25 * 15 / 16, abs=0.015)
    assert len(prior.calls) == 5  # round(20 * 0.25)
    prior.calls.clear()
    sample(prior, init_tokens=init, strength=0.01, steps=20, early_stop=False, generator=gen())
    assert len(prior.calls) == 1  # max(1, round(0.2))
    # with a mask, only masked tokens are corrupted
    prior.calls.clear()
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:, :32] = True
    sample(
        prior,
        init_tokens=init,
        mask=mask,
        strength=0.5,
        steps=10,
        early_stop=False,
        generator=gen(),
    )
    first = prior.calls[0]["tokens"]
    assert (first[:, ~mask] == 0).all()
    assert (first[:, mask] != 0).float().mean().item() == pytest.approx(0.5 * 15 / 16, abs=0.02)
    # strength 1 without mask: pure noise
    prior.calls.clear()
    sample(prior, init_tokens=init, steps=1, generator=gen())
    assert (prior.calls[0]["tokens"] != 0).float().mean().item() == pytest.approx(15 / 16, abs=0.01)


# --------------------------------------------------------------------------------------------
# guidance, labels, determinism, callback, modes
# --------------------------------------------------------------------------------------------


def test_cfg_batches_both_branches_and_matches_reference_mix():
    kw = dict(k=16, grid=(8, 8), num_classes=4)
    labels = [0, 3, 2]
    prior = TablePrior(**kw)
    out = sample(
        prior,
        batch_size=3,
        steps=6,
        labels=labels,
        cfg_scale=2.5,
        early_stop=False,
        generator=gen(11),
    )
    assert len(prior.calls) == 6  # one forward per step ...
    for call in prior.calls:  # ... carrying the conditional and the null branch
        assert call["labels"].tolist() == labels + [-1, -1, -1]
        assert torch.equal(call["tokens"][:3], call["tokens"][3:])
    reference = TablePrior(mix_scale=2.5, **kw)  # mixes u + s (c - u) itself
    ref = sample(
        reference, batch_size=3, steps=6, labels=labels, early_stop=False, generator=gen(11)
    )
    assert torch.equal(out, ref)


def test_cfg_scale_one_is_the_unguided_path_and_zero_is_unconditional():
    kw = dict(k=16, grid=(8, 8), num_classes=4)
    prior = TablePrior(**kw)
    sample(prior, batch_size=2, steps=3, labels=1, cfg_scale=1.0, generator=gen(12))
    assert all(c["labels"].tolist() == [1, 1] for c in prior.calls)  # no null branch
    zero = sample(
        TablePrior(**kw),
        batch_size=2,
        steps=5,
        labels=1,
        cfg_scale=0.0,
        early_stop=False,
        generator=gen(13),
    )
    null = sample(
        TablePrior(**kw), batch_size=2, steps=5, labels=None, early_stop=False, generator=gen(13)
    )
    assert torch.equal(zero, null)


def test_real_prior_cfg_runs_and_labels_forms():
    prior = tiny_prior(num_classes=3)
    a = sample(prior, batch_size=2, steps=4, labels=[1, 2], cfg_scale=3.0, generator=gen(1))
    b = sample(
        prior, batch_size=2, steps=4, labels=torch.tensor([1, 2]), cfg_scale=3.0, generator=gen(1)
    )
    assert torch.equal(a, b)
    c = sample(prior, batch_size=2, steps=4, labels=2, generator=gen(1))
    d = sample(prior, batch_size=2, steps=4, labels=[2, 2], generator=gen(1))
    assert torch.equal(c, d)


def test_same_seed_same_tokens_different_seed_different():
    prior = tiny_prior()
    a = sample(prior, batch_size=2, steps=8, generator=gen(21))
    b = sample(prior, batch_size=2, steps=8, generator=gen(21))
    c = sample(prior, batch_size=2, steps=8, generator=gen(22))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = sample(prior, steps=3)  # generator=None: seeded from the global RNG
    torch.manual_seed(5)
    assert torch.equal(d, sample(prior, steps=3))


def test_grid_and_batch_rules():
    prior = tiny_prior()
    assert sample(prior, steps=2, generator=gen()).shape == (1, 8, 8)  # prior.config.grid
    assert sample(prior, grid=(6, 10), batch_size=3, steps=2, generator=gen()).shape == (3, 6, 10)
    init = torch.randint(0, 16, (2, 4, 12), generator=gen())
    assert sample(prior, init_tokens=init, steps=2, generator=gen()).shape == (2, 4, 12)
    assert sample(prior, init_tokens=init, batch_size=2, steps=2).shape == (2, 4, 12)
    assert sample(prior, init_tokens=init[0], batch_size=3, steps=2).shape == (3, 4, 12)
    with pytest.raises(ValueError, match="batch_size=3 does not match"):
        sample(prior, init_tokens=init, batch_size=3)
    with pytest.raises(ValueError, match="differs from the init_tokens grid"):
        sample(prior, init_tokens=init, grid=(8, 8))


def test_callback_exception_cancels_and_modes_are_restored():
    prior = ShiftPrior(shift=1)
    prior.train()

    class Cancelled(Exception):
        pass

    def cb(step, total, tokens):
        assert tokens.shape == (2, 8, 8) and total == 30
        if step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample(prior, batch_size=2, steps=30, callback=cb, generator=gen())
    assert len(prior.calls) == 3  # no forward after the cancel
    assert all(not c["training"] and not c["grad"] for c in prior.calls)  # eval, inference
    assert prior.training  # mode restored even after the exception


def test_check_interrupt_cancels_inside_a_step_and_is_uninstalled_after():
    prior = tiny_prior().eval()
    steps_done, checks = [], {"n": 0}

    class Cancelled(Exception):
        pass

    def check():
        checks["n"] += 1
        if checks["n"] == 18:  # the second forward (tiny depth (1, 1, 1): 9 checks per forward)
            raise Cancelled

    with pytest.raises(Cancelled):
        sample(prior, steps=5, check_interrupt=check, generator=gen(),
               callback=lambda s, t, x: steps_done.append(s))
    assert steps_done == [1], "the second step was stopped inside its forward"
    with pytest.raises(ValueError, match="check_interrupt must be callable"):
        sample(prior, steps=1, check_interrupt=3)
    with torch.no_grad():
        prior(torch.zeros(1, 8, 8, dtype=torch.long))
    assert checks["n"] == 18, "the check is not left installed after sample() returns"
    a = sample(prior, steps=3, generator=gen(), check_interrupt=lambda: None)
    assert torch.equal(a, sample(prior, steps=3, generator=gen()))


def test_result_is_a_normal_tensor_and_bf16_prior_samples():
    prior = tiny_prior()
    out = sample(prior, steps=2, generator=gen())
    out[0, 0, 0] = 1  # writable outside inference mode
    assert not out.is_inference()
    assert sample(tiny_prior().to(torch.bfloat16), steps=2, generator=gen()).dtype == torch.int64


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
    "kwargs, match",
    [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(temperature=(1.0, -0.5)), "temperature must be > 0"),
        (dict(update_proportion=0.0), r"update_proportion must lie in \(0, 1\]"),
        (dict(update_proportion=(1.0, 1.5)), r"update_proportion must lie in \(0, 1\]"),
        (dict(cfg_scale=2.0), "needs a class-conditional prior with a null class"),
        (dict(mask=torch.ones(8, 8, dtype=torch.bool)), "a mask needs init_tokens"),
        (
            dict(
                init_tokens=torch.zeros(1, 8, 8, dtype=torch.long),
                mask=torch.ones(1, 4, 4, dtype=torch.bool),
            ),
            "does not match the tokens",
        ),
        (
            dict(
                init_tokens=torch.zeros(2, 8, 8, dtype=torch.long),
                mask=torch.ones(3, 8, 8, dtype=torch.bool),
            ),
            "does not match the tokens",
        ),
        (dict(init_tokens=torch.full((1, 8, 8), 16)), r"must lie in \[0, 16\)"),
        (dict(init_tokens=torch.full((1, 8, 8), -1)), r"must lie in \[0, 16\)"),
        (dict(init_tokens=torch.zeros(1, 8, 8)), "integer codebook indices"),
        (dict(labels=2), "this prior is unconditional"),
        (dict(strength=0.0), r"strength must lie in \(0, 1\]"),
        (dict(strength=1.5), r"strength must lie in \(0, 1\]"),
        (dict(strength=0.5), "pass init_tokens or use strength=1"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(grid=(0, 8)), "grid"),
        (dict(min_steps=-1), "min_steps"),
    ],
)
def test_sample_value_errors(kwargs, match):
    prior = ShiftPrior(shift=1)
    with pytest.raises(ValueError, match=match):
        sample(prior, **kwargs)
    assert prior.calls == []


def test_sample_label_errors_on_conditional_priors():
    with pytest.raises(ValueError, match=r"labels must be -1 \(null / unconditional\) or 0..3"):
        sample(ShiftPrior(num_classes=4), labels=4)
    with pytest.raises(ValueError, match="no null class"):
        sample(ShiftPrior(num_classes=4, null_class=False), labels=-1)
    with pytest.raises(ValueError, match="without a null class, so it needs labels"):
        sample(ShiftPrior(num_classes=4, null_class=False))
    with pytest.raises(ValueError, match="and no null class"):
        sample(ShiftPrior(num_classes=4, null_class=False), labels=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match="2 entries"):
        sample(ShiftPrior(num_classes=4), batch_size=2, labels=[0, 1, 2])


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


# --------------------------------------------------------------------------------------------
# schedules computed per step (issue #13 item 6): same tokens, no up-front lists
# --------------------------------------------------------------------------------------------


def _old_schedule_list(start, end, steps):
    """The pre-#13 schedule: a whole list built before step 1 (kept here as the reference)."""
    if steps == 1:
        return [float(start)]
    return [float(start) + (float(end) - float(start)) * i / (steps - 1) for i in range(steps)]


class TokenTablePrior(FakePrior):
    """Logits = a per-position table (dominant) + a table of the current token: the trajectory
    depends on every draw, and samples converge (early stop) at different steps."""

    def __init__(self, **kw):
        super().__init__(**kw)
        g = torch.Generator().manual_seed(7)
        k, (h, w) = self.codebook_size, self.config.grid
        self.token_table = torch.randn(k, k, generator=g) * 0.3
        self.pos_table = torch.randn(h, w, k, generator=g) * 4

    def logits_fn(self, tokens, labels):
        return self.token_table[tokens] + self.pos_table


# tokens from the sampler as it was before schedules became per step (commit 8248235)
SAVED_TOKENS = {
    "schedules": [[[4, 8, 10, 6, 4, 0, 6], [11, 5, 9, 9, 3, 8, 2], [7, 5, 4, 0, 10, 8, 9], [9, 11, 11, 2, 10, 4, 0], [6, 11, 8, 4, 7, 2, 4]], [[4, 8, 10, 6, 3, 1, 6], [11, 5, 9, 9, 3, 8, 2], [4, 10, 5, 0, 10, 8, 9], [9, 10, 11, 2, 10, 4, 10], [6, 10, 7, 4, 1, 2, 4]], [[4, 8, 6, 3, 3, 1, 6], [11, 5, 9, 9, 2, 7, 10], [0, 0, 5, 0, 10, 8, 9], [9, 10, 11, 10, 9, 4, 0], [6, 10, 8, 4, 7, 2, 4]]],  # noqa: E501
    "early_stop": [[[4, 8, 10, 6, 4, 0, 6], [11, 5, 9, 9, 3, 8, 10], [0, 5, 5, 0, 10, 8, 9], [9, 10, 11, 2, 10, 4, 0], [6, 10, 7, 4, 1, 2, 4]], [[4, 8, 6, 3, 4, 0, 6], [11, 5, 9, 9, 3, 8, 10], [0, 5, 5, 0, 10, 8, 9], [9, 10, 11, 2, 10, 4, 0], [6, 10, 7, 4, 7, 2, 4]], [[4, 8, 6, 6, 4, 0, 10], [11, 5, 9, 9, 3, 8, 10], [0, 5, 5, 0, 10, 8, 9], [9, 10, 11, 2, 10, 4, 0], [6, 10, 7, 4, 1, 2, 4]]],  # noqa: E501
    "variation": [[[4, 8, 6, 6, 3, 4, 10], [11, 5, 9, 9, 2, 10, 2], [0, 5, 5, 0, 10, 8, 9], [9, 11, 11, 2, 10, 4, 0], [6, 10, 7, 4, 7, 2, 4]], [[4, 8, 6, 6, 4, 0, 10], [11, 5, 9, 9, 2, 8, 10], [0, 5, 5, 2, 10, 8, 9], [9, 10, 11, 2, 10, 4, 10], [6, 10, 7, 4, 1, 2, 4]]],  # noqa: E501
}


def _saved_cases():
    init = torch.randint(0, 12, (2, 5, 7), generator=torch.Generator().manual_seed(3))
    return {
        "schedules": dict(batch_size=3, steps=9, temperature=(1.3, 0.7), update_proportion=(0.9, 0.3),
                          early_stop=False),
        "early_stop": dict(batch_size=3, steps=50, temperature=(0.5, 0.01), update_proportion=(1.0, 0.6),
                           min_steps=3),
        "variation": dict(init_tokens=init, steps=13, strength=0.37, temperature=(1.1, 0.6),
                          update_proportion=(0.8, 0.5), early_stop=False),
    }


@pytest.mark.parametrize("case", sorted(SAVED_TOKENS))
def test_tokens_are_bit_identical_to_the_list_schedule_sampler(case):
    prior = TokenTablePrior(k=12, grid=(5, 7))
    tokens = sample(prior, generator=gen(11), **_saved_cases()[case])
    assert tokens.tolist() == SAVED_TOKENS[case]
    if case == "early_stop":  # the case really freezes samples and ends early
        assert [c["tokens"].shape[0] for c in prior.calls][-6:] == [3, 2, 2, 2, 2, 2]
        assert len(prior.calls) == 42


@pytest.mark.parametrize(
    ("steps", "strength", "t", "p"),
    [(1, 1.0, (0.8, 0.2), (1.0, 0.5)), (7, 1.0, (1.0, 0.7), (0.9, 0.1)), (10, 0.37, (1.3, 0.1), (1.0, 0.3)),
     (13, 0.05, (2.0, 0.7), (0.7, 0.7)), (100, 0.61, (1.0, 0.7), (1.0, 0.45))],
)
def test_per_step_schedule_values_equal_the_old_lists_exactly(monkeypatch, steps, strength, t, p):
    seen_t, seen_p = [], []
    real_cat, real_uniform = sampler_mod.sample_categorical, sampler_mod.uniform
    monkeypatch.setattr(sampler_mod, "sample_categorical",
                        lambda lg, temp, g, **kw: seen_t.append(temp) or real_cat(lg, temp, g, **kw))

    class Spy:  # `uniform(...) < p`: record the p each step compares with
        def __init__(self, x):
            self.x = x

        def __lt__(self, prop):
            seen_p.append(prop)
            return self.x < prop

    monkeypatch.setattr(sampler_mod, "uniform", lambda *a, **kw: Spy(real_uniform(*a, **kw)))
    init = torch.zeros(1, 4, 4, dtype=torch.long)
    sample(ShiftPrior(shift=1), init_tokens=init, strength=strength, steps=steps, temperature=t,
           update_proportion=p, early_stop=False, generator=gen())
    n_run = steps if strength == 1.0 else max(1, round(steps * strength))
    want_t = _old_schedule_list(*t, steps)[steps - n_run:]
    want_p = [v for v in _old_schedule_list(*p, steps)[steps - n_run:] if v < 1.0]
    assert seen_t == want_t  # exact float equality, not approx
    assert seen_p == want_p


def test_huge_step_counts_allocate_nothing_up_front():
    """steps=10**8 used to build two 10**8-float lists (8.6 GB, a minute) before step 1; now the
    first step runs at once. With 5 * 10**4 steps, cancelled in the first step, the old lists
    took ~4 MB of Python objects; the per-step schedule takes none."""
    import tracemalloc

    class Cancel(Exception):
        pass

    def stop(step, total, tokens):
        assert total == 5 * 10**4
        raise Cancel

    prior = ShiftPrior(shift=1, k=16, grid=(4, 4))
    kw = dict(temperature=(1.0, 0.5), update_proportion=(1.0, 0.5), generator=gen())
    sample(prior, steps=3, **kw)  # warm-up: first-call allocations are not the schedules
    prior.calls.clear()
    tracemalloc.start()
    try:
        with pytest.raises(Cancel):
            sample(prior, steps=5 * 10**4, callback=stop, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(prior.calls) == 1
    assert peak < 2**20, f"sample() allocated {peak / 2**20:.1f} MiB of Python objects for one step"
