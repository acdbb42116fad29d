"""SundaePrior: shapes on any grid, per-head 2D rotary, patch-aligned resampling, padding,
input validation, class conditioning, cancel inside a forward (config and files:
test_prior_config.py).

References are independent of the code under test: hand-computed positions, a complex-number
RoPE + einsum-softmax attention, set arithmetic over patches.
Bug tags (B1, B2, ...) are the official code's, listed in docs/official-code.md.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib import PriorConfig, SundaePrior
from comfyui_sundae.sundae_lib.layers import (
    Attention,
    ResampleDown,
    ResampleUp,
    Rotary2D,
    check_interrupt,
    grid_positions,
    interrupt_check,
    rowwise,
)
from comfyui_sundae.sundae_lib.prior import Hourglass
from conftest import TWO_LEVELS, tiny_prior
from einops import rearrange

pytestmark = pytest.mark.usefixtures("one_thread")


def rand_tokens(b: int, h: int, w: int, k: int = 16) -> torch.Tensor:
    return torch.randint(0, k, (b, h, w))


# --------------------------------------------------------------------------------------------
# shapes, grids, padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [2, (1, 1, 1), TWO_LEVELS])
@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (7, 5), (1, 1), (3, 9)])
def test_logits_shape_any_grid(depth, grid):
    prior = tiny_prior(depth=depth)  # trained grid (8, 8); every other grid must run too
    with torch.no_grad():
        logits = prior(rand_tokens(2, *grid))
    assert logits.shape == (2, *grid, 16)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_odd_grid_two_levels_trains():
    # 7×5 pads to 8×6 at level 1 (-> 4×3) and to 4×4 at level 2 (-> 2×2): the official padding
    # path crashed here (bug B6). Every parameter must receive a gradient.
    prior = tiny_prior(depth=TWO_LEVELS, num_classes=3).train()
    logits = prior(rand_tokens(3, 7, 5), torch.tensor([0, 2, -1]))
    F.cross_entropy(rearrange(logits, "b h w k -> (b h w) k"), rand_tokens(3, 7, 5).flatten()).backward()
    dead = [n for n, p in prior.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_flat_depth_has_no_shortening():
    prior = tiny_prior(depth=3)
    names = {n.split(".")[1] for n, _ in prior.named_parameters() if n.startswith("body.")}
    assert names == {"layers"}
    assert len(prior.body.layers) == 3
    hourglass = tiny_prior(depth=TWO_LEVELS)
    assert isinstance(hourglass.body, Hourglass) and isinstance(hourglass.body.valley, Hourglass)


def test_positions_are_patch_centres_in_full_resolution_units():
    ys, xs = grid_positions(2, 3, stride=1)
    assert ys.tolist() == [0, 0, 0, 1, 1, 1] and xs.tolist() == [0, 1, 2, 0, 1, 2]
    # one level down (s = 2): coarse (I, J) sits at ((I + 0.5)·2 - 0.5, ...) = (2I + 0.5, ...)
    ys, xs = grid_positions(2, 2, stride=2)
    assert ys.tolist() == [0.5, 0.5, 2.5, 2.5] and xs.tolist() == [0.5, 2.5, 0.5, 2.5]
    # two levels down: centre of a 4×4 block of fine tokens
    ys, xs = grid_positions(1, 2, stride=4)
    assert ys.tolist() == [1.5, 1.5] and xs.tolist() == [1.5, 5.5]


def test_autocast_bf16_forward_runs():
    prior = tiny_prior(depth=TWO_LEVELS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prior(rand_tokens(1, 5, 6))
    assert logits.shape == (1, 5, 6, 16) and torch.isfinite(logits.float()).all()


# --------------------------------------------------------------------------------------------
# 2D rotary on every head
# --------------------------------------------------------------------------------------------


def reference_rope(x: torch.Tensor, pos_y: torch.Tensor, pos_x: torch.Tensor, base: float):
    """Independent RoPE: channels (c, c + e/2) as one complex number; the first e/4 pairs turn
    with the row, the rest with the column; frequency k = base^(-k / (e/4))."""
    e = x.shape[-1]
    n_f = e // 4
    freqs = base ** (-torch.arange(n_f, dtype=torch.float64) / n_f)
    theta = torch.cat([pos_y.double()[:, None] * freqs, pos_x.double()[:, None] * freqs], -1)
    z = torch.complex(x[..., : e // 2].double(), x[..., e // 2 :].double()) * torch.polar(
        torch.ones_like(theta), theta
    )
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def reference_heads(attn: Attention, x, pos_y, pos_x, base, rotate_heads=None):
    """Per-head attention by einsum + softmax; rotary only on ``rotate_heads`` (default all)."""
    heads = attn.heads
    q = rearrange(attn.to_q(x), "b n (h e) -> b h n e", h=heads)
    k, v = (rearrange(t, "b n (h e) -> b h n e", h=heads) for t in attn.to_kv(x).chunk(2, -1))
    rotate_heads = range(heads) if rotate_heads is None else rotate_heads
    q, k = q.clone(), k.clone()
    for h in rotate_heads:
        q[:, h] = reference_rope(q[:, h], pos_y, pos_x, base)
        k[:, h] = reference_rope(k[:, h], pos_y, pos_x, base)
    scores = torch.einsum("bhne,bhme->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bhme->bhne", scores.softmax(-1), v)


def per_head_change(out_a, out_b_permuted_back):
    """max |difference| per head: [heads]."""
    return (out_a - out_b_permuted_back).abs().amax(dim=(0, 2, 3))


def test_attention_matches_independent_rope_reference():
    attn = Attention(32, heads=4, dim_head=8)
    rot = Rotary2D(8, base=100.0)
    h, w = 3, 5
    x = torch.randn(2, h * w, 32)
    pos_y, pos_x = grid_positions(h, w, stride=2)
    tables = rot.tables(pos_y, pos_x)
    ours = attn.heads_output(x, rot_q=tables, rot_k=tables)
    ref = reference_heads(attn, x, pos_y, pos_x, 100.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_rotary_reaches_every_head():
    """Permuting token positions must change every head's output (without positions,
    attention is permutation-equivariant: out(P x) = P out(x))."""
    torch.manual_seed(1)
    heads, h, w = 4, 4, 4
    attn = Attention(32, heads=heads, dim_head=8)
    rot = Rotary2D(8, base=100.0)
    x = torch.randn(1, h * w, 32)
    perm = torch.randperm(h * w)
    tables = rot.grid(h, w, stride=1, device=x.device)

    out = attn.heads_output(x, rot_q=tables, rot_k=tables)
    out_perm = attn.heads_output(x[:, perm], rot_q=tables, rot_k=tables)
    change = per_head_change(out[:, :, perm], out_perm)
    assert (change > 1e-2).all(), f"heads without position information: {change}"

    # control: with zero angles the same measurement sees no change in any head
    still = (torch.ones(h * w, 8), torch.zeros(h * w, 8))
    out0 = attn.heads_output(x, rot_q=still, rot_k=still)
    out0_perm = attn.heads_output(x[:, perm], rot_q=still, rot_k=still)
    assert (per_head_change(out0[:, :, perm], out0_perm) < 1e-5).all()

    # control: the official layout (rotary on head 0 only, bug B2) fails this test
    pos_y, pos_x = grid_positions(h, w, stride=1)
    b2 = reference_heads(attn, x, pos_y, pos_x, 100.0, rotate_heads=[0])
    b2_perm = reference_heads(attn, x[:, perm], pos_y, pos_x, 100.0, rotate_heads=[0])
    b2_change = per_head_change(b2[:, :, perm], b2_perm)
    assert b2_change[0] > 1e-2 and (b2_change[1:] < 1e-5).all()


def test_rotary_reaches_every_head_inside_the_prior():
    # a flat one-block prior; capture the per-head attention output (input of to_out)
    prior = tiny_prior(depth=1, heads=4)  # dim 32 -> 4 heads of 8
    attn = prior.body.layers[0].attn
    captured = []
    attn.to_out.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    tokens = rand_tokens(1, 4, 4)
    perm = torch.randperm(16)
    moved = rearrange(rearrange(tokens, "b h w -> b (h w)")[:, perm], "b (h w) -> b h w", h=4)
    with torch.no_grad():
        prior(tokens), prior(moved)
    a, b = (rearrange(c, "b n (heads e) -> b heads n e", heads=4) for c in captured)
    change = per_head_change(a[:, :, perm], b)
    assert (change > 1e-6).all(), f"heads without position information in the prior: {change}"


# --------------------------------------------------------------------------------------------
# attention resampling: same 2D patches as the projections
# --------------------------------------------------------------------------------------------


def _resample(cls, **kw):
    args = dict(dim=32, factor=2, heads=2, dim_head=16, ff_mult=2, dropout=0.0, stride=1,
                rotary=Rotary2D(16, 100.0))
    return cls(**{**args, **kw}).eval()


def changed_cells(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> set[tuple[int, int]]:
    """Grid cells (i, j) where [1, h, w, d] tensors differ."""
    diff = (a - b).abs().amax(dim=(0, 3))
    return {tuple(ij) for ij in (diff > tol).nonzero().tolist()}


def strip_grouping(block: ResampleDown, coarse, fine):
    """The official (bug B1) grouping: coarse token m attends to raster tokens 4m..4m+3."""
    q = rearrange(block.norm_q(coarse), "b hc wc d -> (b hc wc) 1 d")
    kv = rearrange(block.norm_kv(fine), "b hh ww d -> b (hh ww) d")
    kv = rearrange(kv, "b (g m) d -> (b g) m d", m=4)
    out = block.attn(q, kv)
    return rearrange(out, "(b hc wc) 1 d -> b hc wc d", b=1, hc=coarse.shape[1])


@torch.no_grad()
def test_resample_down_attends_to_its_own_2d_patch():
    block = _resample(ResampleDown)
    coarse, fine = torch.randn(1, 3, 4, 32), torch.randn(1, 6, 8, 32)
    edited = fine.clone()
    edited[:, 2:4, 4:6] += torch.randn(1, 2, 2, 32)  # only the 2×2 patch of coarse cell (1, 2)
    ours = changed_cells(block.patch_attention(coarse, fine, (6, 8)),
                         block.patch_attention(coarse, edited, (6, 8)))
    assert ours == {(1, 2)}
    # the same check detects the official 1×4 raster strips: rows 2 and 3, columns 4..5, are
    # raster tokens 20, 21, 28, 29 -> strips 5 and 7 -> coarse cells (1, 1) and (1, 3)
    strips = changed_cells(strip_grouping(block, coarse, fine), strip_grouping(block, coarse, edited))
    assert strips == {(1, 1), (1, 3)}


@torch.no_grad()
def test_hourglass_projection_and_resampling_share_the_patch():
    """Through the whole down path (space-to-depth + Linear + ResampleDown): editing one fine
    patch changes exactly one valley input."""
    cfg = PriorConfig.preset("tiny", depth=(0, 1, 0))
    hourglass = SundaePrior(cfg).eval().body
    captured = []
    hourglass.valley.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    x = torch.randn(1, 6, 8, 32)
    edited = x.clone()
    edited[:, 4:6, 2:4] -= 1.0  # patch of coarse cell (2, 1)
    hourglass(x), hourglass(edited)
    assert changed_cells(*captured) == {(2, 1)}


@torch.no_grad()
def test_resample_down_ignores_padding():
    block = _resample(ResampleDown)
    coarse = torch.randn(1, 3, 4, 32)
    fine = torch.randn(1, 6, 8, 32)
    fine[:, 5:, :] = 0  # real grid is 5×7, the last row and column are padding
    fine[:, :, 7:] = 0
    garbage = fine.clone()
    garbage[:, 5:, :] = 100 * torch.randn(1, 1, 8, 32)
    garbage[:, :, 7:] = 100 * torch.randn(1, 6, 1, 32)
    torch.testing.assert_close(block.patch_attention(coarse, fine, (5, 7)),
                               block.patch_attention(coarse, garbage, (5, 7)))
    # without the real size, the padding would be attended to
    assert changed_cells(block.patch_attention(coarse, fine, (6, 8)),
                         block.patch_attention(coarse, garbage, (6, 8)))


@torch.no_grad()
def test_resample_up_uses_the_3x3_neighbourhood_of_the_parent():
    block = _resample(ResampleUp)
    fine, coarse = torch.randn(1, 8, 10, 32), torch.randn(1, 4, 5, 32)
    edited = coarse.clone()
    edited[:, 1, 3] += torch.randn(32)
    got = changed_cells(block.neighbour_attention(fine, coarse),
                        block.neighbour_attention(fine, edited))
    expected = {(i, j) for i in range(8) for j in range(10)
                if abs(i // 2 - 1) <= 1 and abs(j // 2 - 3) <= 1}
    assert got == expected


def test_resample_up_query_key_projections_learn():
    """Bug B3: with one key per query the softmax is 1 and q/k get no gradient."""
    block = _resample(ResampleUp).train()
    fine, coarse = torch.randn(1, 6, 6, 32), torch.randn(1, 3, 3, 32)
    block.neighbour_attention(fine, coarse).square().sum().backward()
    learning = block.attn.to_q.weight.grad.abs().sum().item()
    assert learning > 1e-3
    # control: a 1×1 coarse grid leaves a single valid key -> zero gradient (up to rounding)
    block.zero_grad()
    block.neighbour_attention(fine[:, :2, :2], coarse[:, :1, :1]).square().sum().backward()
    assert block.attn.to_q.weight.grad.abs().sum().item() < 1e-3 * learning


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.rand(1, 4, 4), r"integer codebook indices .* got dtype torch.float32"),
        (torch.zeros(1, 4, 4, dtype=torch.bool), r"got dtype torch.bool"),
        (torch.zeros(4, 4, dtype=torch.long), r"shape \[b, h, w\], got \(4, 4\).*tokens\[None\]"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), r"shape \[b, h, w\], got \(1, 1, 4, 4\)"),
        (torch.full((1, 4, 4), 16), r"span \[16, 16\] but this prior has 16 codes: tokens must lie in \[0, 16\)"),
        (torch.full((1, 4, 4), -1), r"span \[-1, -1\]"),
        (torch.zeros(0, 4, 4, dtype=torch.long), r"is empty"),
        ([[[0]]], r"must be a torch.Tensor"),
    ],
)
def test_bad_tokens(tokens, match):
    with pytest.raises(ValueError, match=match):
        tiny_prior()(tokens)


@pytest.mark.parametrize(
    "overrides, labels, match",
    [
        (dict(num_classes=3), torch.tensor([3, 0]),
         r"labels \[3, 0\] out of range; this prior has 3 classes: use 0..2 or -1"),
        (dict(num_classes=3), torch.tensor([-2, 0]), r"out of range"),
        (dict(num_classes=3, null_class=False, class_dropout=0.0), torch.tensor([-1, 0]),
         r"use 0..2$"),
        (dict(num_classes=3, null_class=False, class_dropout=0.0), None, r"labels are required"),
        (dict(num_classes=3), torch.tensor([0, 1, 2]), r"shape \[b\] = \[2\].*got shape \(3,\)"),
        (dict(num_classes=3), torch.tensor([0.0, 1.0]), r"integer class indices"),
        (dict(), torch.tensor([0, 1]), r"unconditional .* pass labels=None"),
    ],
)
def test_bad_labels(overrides, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_prior(**overrides)(rand_tokens(2, 4, 4), labels)


# --------------------------------------------------------------------------------------------
# class conditioning
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_null_class_and_conditioning():
    prior = tiny_prior(num_classes=5)
    tokens = rand_tokens(2, 6, 6)
    none = prior(tokens)
    minus = prior(tokens, torch.tensor([-1, -1]))
    assert torch.equal(none, minus)
    cls0, cls1 = prior(tokens, torch.tensor([0, 0])), prior(tokens, torch.tensor([1, 1]))
    assert (cls0 - cls1).abs().max() > 1e-4 and (cls0 - none).abs().max() > 1e-4
    # None really is the null row: make the null embedding a copy of class 3's
    prior.class_emb.weight[5] = prior.class_emb.weight[3]
    torch.testing.assert_close(prior(tokens), prior(tokens, torch.tensor([3, 3])), rtol=0, atol=0)
    # a scalar label broadcasts; mixed batches use per-sample labels
    torch.testing.assert_close(prior(tokens, 3), prior(tokens, torch.tensor([3, 3])))
    mixed = prior(tokens, torch.tensor([0, 1]))
    torch.testing.assert_close(mixed[0], cls0[0])
    torch.testing.assert_close(mixed[1], cls1[1])


def test_unvalidated_forward_equals_validated_forward():
    """``validate=False`` (used inside the sampler loop to avoid host syncs) changes nothing but
    the checks: same logits for explicit, null (-1) and omitted labels."""
    prior = tiny_prior(num_classes=3)
    tokens = torch.randint(0, prior.codebook_size, (3, 5, 7))
    labels = torch.tensor([0, -1, 2])
    with torch.no_grad():
        assert torch.equal(prior(tokens, labels), prior(tokens, labels, validate=False))
        assert torch.equal(prior(tokens, None), prior(tokens, None, validate=False))
        assert torch.equal(prior(tokens, torch.full((3,), -1)), prior(tokens, None, validate=False))


# --------------------------------------------------------------------------------------------
# cancel inside a forward
# --------------------------------------------------------------------------------------------


def _reference_forward(prior: SundaePrior, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The forward written out from the submodules, as it was before the interrupt hook: the
    hook must not change a single bit."""

    def stack(module, x):
        _, h, w, _ = x.shape
        if len(module.layers) == 0:
            return x
        rot = module.rotary.grid(h, w, stride=module.stride, device=x.device)
        x = rearrange(x, "b h w d -> b (h w) d")
        for layer in module.layers:
            x = layer(x, rot)
        return rearrange(x, "b (h w) d -> b h w d", h=h, w=w)

    def level(module, x):
        if not isinstance(module, Hourglass):
            return stack(module, x)
        s = module.factor
        _, h, w, _ = x.shape
        x = stack(module.pre, x)
        fine = F.pad(x, (0, 0, 0, (-w) % s, 0, (-h) % s))
        coarse = module.down(rearrange(fine, "b (hc s1) (wc s2) d -> b hc wc (d s1 s2)", s1=s, s2=s))
        coarse = level(module.valley, module.resample_down(coarse, fine, (h, w)))
        up = rearrange(module.up(coarse), "b hc wc (d s1 s2) -> b (hc s1) (wc s2) d", s1=s, s2=s)
        up = module.resample_up(up + fine, coarse)
        return stack(module.post, up[:, :h, :w])

    labels = torch.where(labels < 0, torch.full_like(labels, prior.num_classes), labels)
    x = prior.token_emb(tokens) + rearrange(prior.class_emb(labels), "b d -> b 1 1 d")
    return prior.to_logits(prior.norm_out(level(prior.body, x)))


def test_interrupt_check_runs_between_blocks_and_levels_and_changes_no_bit():
    torch.manual_seed(0)
    prior = tiny_prior(num_classes=3, depth=TWO_LEVELS)
    tokens, labels = rand_tokens(2, 9, 7), torch.tensor([0, -1])
    calls = []
    with torch.no_grad():
        plain = prior(tokens, labels)
        with interrupt_check(lambda: calls.append(1)):
            hooked = prior(tokens, labels)
        reference = _reference_forward(prior, tokens, labels)
    assert torch.equal(plain, reference) and torch.equal(hooked, reference)
    # 2 per block (before it, between attention and FF) for the 5 blocks (pre, inner pre,
    # valley, inner post, post) + 2 per level (2 levels) + 1 before the logits
    assert len(calls) == 2 * 5 + 2 * 2 + 1
    with torch.no_grad():
        prior(tokens, labels)
    assert len(calls) == 15, "the check is uninstalled when the with block ends"


def test_interrupt_check_raising_stops_the_forward_mid_way():
    prior = tiny_prior(depth=TWO_LEVELS)
    ran = []
    for m in prior.modules():
        if type(m).__name__ == "Block":
            m.register_forward_hook(lambda *_: ran.append("block"))
    prior.to_logits.register_forward_hook(lambda *_: ran.append("logits"))
    calls = {"n": 0}

    class Cancelled(Exception):
        pass

    def check():
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise Cancelled()

    # checks: 1 before block 1, 2 inside it, 3 before the inner level, 4 before block 2 (the
    # inner level's first), 5 between its attention and its FF
    for stop_at, blocks in [(4, ["block"]), (5, ["block"]), (6, ["block", "block"])]:
        ran.clear()
        calls["n"] = 0
        with torch.no_grad(), pytest.raises(Cancelled), interrupt_check(check):
            prior(rand_tokens(1, 8, 8))
        assert ran == blocks, f"blocks after the check that raised must not run ({stop_at=})"


def test_long_layers_are_split_for_cancel_with_the_same_numbers(monkeypatch):
    """At huge grids one attention, FF or logits matmul runs for minutes on a CPU: with a check
    installed they go through in row chunks, a check between chunks, computing the same bits."""
    from comfyui_sundae.sundae_lib import layers

    torch.manual_seed(0)
    prior = tiny_prior(num_classes=3, depth=TWO_LEVELS)
    tokens, labels = rand_tokens(2, 9, 7), torch.tensor([0, -1])
    with torch.no_grad():
        plain = prior(tokens, labels)
        monkeypatch.setattr(layers, "CHUNK_MACS", 4096)  # a few rows per chunk at this size
        calls = []
        with interrupt_check(lambda: calls.append(1)):
            chunked = prior(tokens, labels)
        unhooked = prior(tokens, labels)  # no check installed: never split
    assert torch.equal(chunked, plain) and torch.equal(unhooked, plain)
    assert len(calls) > 2 * 15, f"only {len(calls)} checks: the layers were not split"
    ran = {"n": 0}

    class Cancelled(Exception):
        pass

    def check():
        ran["n"] += 1
        if ran["n"] == 3:  # inside the first block's attention
            raise Cancelled()

    with torch.no_grad(), pytest.raises(Cancelled), interrupt_check(check):
        prior(tokens, labels)


def test_interrupt_hook_leaves_torch_compile_graphs_whole():
    """The trainer compiles the objective: the hook (a context variable dynamo cannot trace)
    must not break the graph at every block; compiled code skips it."""

    def step(x):
        check_interrupt()
        return rowwise(lambda t: t + 1, x, macs_per_row=2**40)  # would split in eager mode

    calls = []
    torch._dynamo.reset()
    with interrupt_check(lambda: calls.append(1)):
        explained = torch._dynamo.explain(step)(torch.ones(64, 2))
        calls.clear()
        step(torch.ones(64, 2))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons][:2]
    assert len(calls) == 1 + 64 // 16, "the eager call checks (and splits the rows)"
