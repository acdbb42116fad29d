"""The prior keeps the rotary tables of its trained grid and of its resampling windows as
buffers (``FixedRotary``) instead of computing them every forward: the same numbers as tables
computed per forward (to the bit), nothing in the state dict, exact float32 through dtype casts
and device moves, and buildable on the meta device."""

from __future__ import annotations

import torch
from comfyui_sundae.sundae_lib import PriorConfig, SundaePrior
from comfyui_sundae.sundae_lib._helpers import build_on_meta
from comfyui_sundae.sundae_lib.layers import (
    FIXED_TABLE_MAX,
    FixedRotary,
    ResampleDown,
    ResampleUp,
    Stack,
    grid_positions,
)


def _config(**overrides) -> PriorConfig:
    # depth (1, (1, 1, 1), 1): two hourglass levels, so a valley Stack at stride 4 too
    return PriorConfig.preset("tiny", **{"grid": (7, 6), "depth": (1, (1, 1, 1), 1), **overrides})


def _prior(**overrides) -> SundaePrior:
    torch.manual_seed(0)
    return SundaePrior(_config(**overrides)).eval()


def _tables(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{t}": getattr(mod, t).clone() for name, mod in m.named_modules()
            if isinstance(mod, FixedRotary) for t in ("cos", "sin")}


def test_kept_tables_equal_the_tables_computed_per_forward():
    m = _prior()
    stacks = [mod for mod in m.modules() if isinstance(mod, Stack) and mod.table is not None]
    # the fine level (7 × 6 tokens, pre and post) and two coarser ones: 4 × 3, then 2 × 2
    assert sorted({(s.size, s.stride) for s in stacks}) == [((2, 2), 4), ((4, 3), 2), ((7, 6), 1)]
    for st in stacks:
        for got, want in zip(st.table(), st.rotary.grid(*st.size, stride=st.stride, device="cpu"),
                             strict=True):
            assert got.dtype == torch.float32 and torch.equal(got, want)
    for block in [mod for mod in m.modules() if isinstance(mod, ResampleDown | ResampleUp)]:
        s, stride, rot = block.factor, block.stride, block.rotary
        ky, kx = grid_positions(s, s, stride=1)
        for got, want in zip(block.rot_fine(), rot.tables(ky * stride, kx * stride), strict=True):
            assert torch.equal(got, want)
        if isinstance(block, ResampleDown):
            centre = torch.full((1,), (s - 1) / 2 * stride)
            want_other, got_other = rot.tables(centre, centre), block.rot_centre()
        else:  # neighbour centres (dy·s + (s-1)/2)·S, dy outer, dx inner
            d = torch.arange(-1, 2)
            off = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1).reshape(9, 2).float()
            c = (s - 1) / 2
            want_other = rot.tables((off[:, 0] * s + c) * stride, (off[:, 1] * s + c) * stride)
            got_other = block.rot_neighbours()
        for got, want in zip(got_other, want_other, strict=True):
            assert torch.equal(got, want)


def test_forward_with_kept_tables_equals_the_forward_without():
    m = _prior()
    plain = _prior()
    for mod in plain.modules():
        if isinstance(mod, Stack):
            mod.table = None  # every level computes its table per forward, as before
    g = torch.Generator().manual_seed(1)
    for grid in [(7, 6), (5, 9), (1, 1)]:  # the trained grid (kept tables) and others
        tokens = torch.randint(0, m.codebook_size, (2, *grid), generator=g)
        with torch.no_grad():
            assert torch.equal(m(tokens), plain(tokens)), grid


def test_tables_stay_exact_float32_through_dtype_casts():
    m = _prior()
    before = _tables(m)
    m.bfloat16()
    assert all(t.dtype == torch.float32 for t in _tables(m).values())
    m.half().float()
    after = _tables(m)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in m.parameters())  # the cast itself still happened


def test_tables_are_not_in_the_state_dict():
    m = _prior()
    assert _tables(m)  # there are kept tables ...
    keys = set(m.state_dict())
    assert not [k for k in keys if k.endswith((".cos", ".sin"))]  # ... none of them saved
    fresh = _prior()
    fresh.load_state_dict(m.state_dict(), strict=True)


def test_prior_builds_on_meta_and_fills_its_tables_when_materialised():
    m = build_on_meta(lambda: SundaePrior(_config()))
    assert all(t.is_meta for t in _tables(m).values())
    m.to_empty(device="cpu")
    want = _tables(_prior())
    got = _tables(m)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_huge_trained_grid_keeps_no_table_for_its_fine_level():
    side = 1 + int((FIXED_TABLE_MAX / 16) ** 0.5)  # tiny's dim_head is 16
    m = build_on_meta(lambda: SundaePrior(PriorConfig.preset("tiny", grid=(side, side))))
    assert m.config.head_dim == 16
    assert m.body.pre.table is None and m.body.post.table is None
    assert m.body.valley.table is not None  # a quarter of the positions: kept
