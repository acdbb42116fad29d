"""Sampler: schedules, early stop with a shrinking batch (official bug B8 in
docs/official-code.md), inpainting invariants, variations, classifier-free guidance,
determinism, cancel, and every ValueError of ``sample`` (the objective: test_loss.py).

Most tests use small fake priors whose logits are a known function of the input, so expected
values are computed by hand; the real ``SundaePrior`` ("tiny" preset) covers the end-to-end paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib import sample
from comfyui_sundae.sundae_lib import sampler as sampler_mod
from comfyui_sundae.sundae_lib.sampler import schedule
from conftest import PEAK, FakePrior, ShiftPrior, gen, tiny_prior


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


# --------------------------------------------------------------------------------------------
# schedules
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
    with pytest.raises(ValueError, match=r"labels \[4\] out of range.*use 0..3 or -1 \(null / unconditional\)"):
        sample(ShiftPrior(num_classes=4), labels=4)
    with pytest.raises(ValueError, match="no null class"):
        sample(ShiftPrior(num_classes=4, null_class=False), labels=-1)
    with pytest.raises(ValueError, match="without a null class, so labels are required"):
        sample(ShiftPrior(num_classes=4, null_class=False))
    with pytest.raises(ValueError, match="and no null class"):
        sample(ShiftPrior(num_classes=4, null_class=False), labels=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match="2 entries"):
        sample(ShiftPrior(num_classes=4), batch_size=2, labels=[0, 1, 2])


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
