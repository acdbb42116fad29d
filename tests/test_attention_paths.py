"""The prior's faster attention paths compute what the plain ones compute.

- ``window_attention`` (the resampling blocks' tiny key sets) against
  ``F.scaled_dot_product_attention``, values and gradients, with and without a mask;
- ``ResampleUp`` projects every coarse token's keys and values once (not once per 3×3 window it
  falls in) and still equals the windows-then-project computation written out here;
- the fused q/k/v projection that compiled inference uses equals the two separate projections.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib.layers import (
    WINDOW_KEYS,
    Attention,
    ResampleUp,
    Rotary2D,
    grid_positions,
    window_attention,
)
from einops import rearrange, repeat


def _qkv_mask(groups=12, heads=2, n=4, m=9, e=8, dtype=torch.float32, seed=0):
    """Resampling-sized inputs: ``groups`` windows of ``n`` queries and ``m`` keys; a random
    per-window key mask that always keeps key 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(groups, heads, n, e, generator=g)
    k = torch.randn(groups, heads, m, e, generator=g)
    v = torch.randn(groups, heads, m, e, generator=g)
    mask = torch.rand(groups, 1, 1, m, generator=g) < 0.6
    mask[..., 0] = True  # every query keeps at least one key
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_equals_sdpa_values_and_gradients(masked):
    q, k, v, mask = _qkv_mask()
    mask = mask if masked else None
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ours = window_attention(*leaves, mask)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_leaves, attn_mask=mask)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    ref.backward(grad)
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_window_attention_keeps_the_dtype_and_the_precision_of_bf16_inputs():
    q, k, v, mask = _qkv_mask(dtype=torch.bfloat16)
    ours = window_attention(q, k, v, mask)
    assert ours.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    # scores and softmax in float32: only the final rounding to bf16 (~0.4% relative) remains
    torch.testing.assert_close(ours.double(), exact, atol=2e-2, rtol=1e-2)


def test_window_attention_keeps_float32_scores_under_autocast():
    """Training runs under bf16 autocast: the scores must not be rounded to bf16 there."""
    q, k, v, mask = _qkv_mask(dtype=torch.bfloat16)
    plain = window_attention(q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = window_attention(q, k, v, mask)
    assert under.dtype == torch.bfloat16
    torch.testing.assert_close(under, plain, atol=0, rtol=0)


def test_window_attention_masked_keys_get_no_weight():
    q, k, v, mask = _qkv_mask()
    out = window_attention(q, k, v, mask)
    hidden = ~mask[:, :, 0, :, None].expand_as(k)  # [groups, heads, m, e]: keys masked out
    k2, v2 = k.masked_fill(hidden, 1e4), v.masked_fill(hidden, -1e4)
    torch.testing.assert_close(window_attention(q, k2, v2, mask), out)


def test_attention_takes_the_window_path_only_for_short_key_sets(monkeypatch):
    calls = []
    import comfyui_sundae.sundae_lib.layers as layers

    real = layers.window_attention
    monkeypatch.setattr(layers, "window_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attn = Attention(16, heads=2, dim_head=8).eval()
    with torch.no_grad():
        attn(torch.randn(2, 3, 16), torch.randn(2, WINDOW_KEYS, 16))
        assert len(calls) == 1
        attn(torch.randn(2, 3, 16), torch.randn(2, WINDOW_KEYS + 1, 16))
        assert len(calls) == 1  # longer key sets: scaled_dot_product_attention


def _windows_then_project(block: ResampleUp, fine, coarse):
    """ResampleUp's attention as first written: stack the 3×3 windows of the normed coarse
    tokens (a zero ring outside), then project every window's 9 tokens, then SDPA."""
    s, st = block.factor, block.stride
    b, hc, wc, _ = coarse.shape
    q = rearrange(block.norm_q(fine), "b (hc s1) (wc s2) d -> (b hc wc) (s1 s2) d", s1=s, s2=s)
    ctx = F.pad(block.norm_kv(coarse), (0, 0, 1, 1, 1, 1))
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    windows = torch.stack([ctx[:, 1 + dy:1 + dy + hc, 1 + dx:1 + dx + wc] for dy, dx in offsets], 3)
    context = rearrange(windows, "b hc wc k d -> (b hc wc) k d")
    valid = torch.zeros(hc, wc, 9, dtype=torch.bool)
    for i, (dy, dx) in enumerate(offsets):
        for r in range(hc):
            for c in range(wc):
                valid[r, c, i] = 0 <= r + dy < hc and 0 <= c + dx < wc
    mask = repeat(valid, "hc wc k -> (b hc wc) 1 1 k", b=b)
    qy, qx = grid_positions(s, s, stride=1)
    ky = torch.tensor([dy * s + (s - 1) / 2 for dy, _ in offsets])
    kx = torch.tensor([dx * s + (s - 1) / 2 for _, dx in offsets])
    attn = block.attn
    heads = attn.heads
    qh = rearrange(attn.to_q(q), "g n (h e) -> g h n e", h=heads)
    kh, vh = (rearrange(t, "g m (h e) -> g h m e", h=heads) for t in attn.to_kv(context).chunk(2, -1))
    from comfyui_sundae.sundae_lib.layers import apply_rotary

    qh = apply_rotary(qh, block.rotary.tables(qy * st, qx * st))
    kh = apply_rotary(kh, block.rotary.tables(ky * st, kx * st))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    out = attn.to_out(rearrange(out, "g h n e -> g n (h e)"))
    return rearrange(out, "(b hc wc) (s1 s2) d -> b (hc s1) (wc s2) d", b=b, hc=hc, wc=wc, s1=s, s2=s)


@pytest.mark.parametrize("grad", [False, True])
def test_resample_up_projects_each_coarse_token_once_with_the_same_result(grad):
    torch.manual_seed(0)
    block = ResampleUp(dim=32, factor=2, heads=2, dim_head=16, ff_mult=2, dropout=0.0, stride=2,
                       rotary=Rotary2D(16, 100.0)).eval()
    fine, coarse = torch.randn(2, 6, 8, 32), torch.randn(2, 3, 4, 32)
    rows = []
    block.attn.to_kv.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    with torch.set_grad_enabled(grad):
        ours = block.neighbour_attention(fine, coarse)
    assert rows == [2 * 3 * 4]  # one row per coarse token, not 9 per fine patch
    with torch.no_grad():
        torch.testing.assert_close(ours, _windows_then_project(block, fine, coarse),
                                   atol=1e-5, rtol=1e-5)


def test_fused_qkv_projection_equals_the_separate_ones(monkeypatch):
    """The branch compiled inference takes (one matmul against [to_q; to_kv]), forced here in
    eager mode: same output, and neither projection module runs on its own."""
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8).eval()
    x = torch.randn(2, 10, 32)
    pos_y, pos_x = grid_positions(2, 5, stride=1)
    tables = Rotary2D(8, 100.0).tables(pos_y, pos_x)
    with torch.no_grad():
        separate = attn(x, rot_q=tables, rot_k=tables)
    ran = []
    for m in (attn.to_q, attn.to_kv):
        m.register_forward_hook(lambda m, i, o: ran.append(m))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        fused = attn(x, rot_q=tables, rot_k=tables)
    assert ran == []
    torch.testing.assert_close(fused, separate, atol=1e-6, rtol=1e-6)
    with torch.enable_grad():  # training keeps the two projections (their own gradients)
        attn(x, rot_q=tables, rot_k=tables)
    assert len(ran) == 2


def test_window_attention_runs_on_devices_without_autocast():
    """torch.autocast(device, enabled=False) raises on devices that have no autocast (DirectML,
    MPS before torch 2.5, meta): there window_attention must not enter it. The meta device
    stands in for them here."""
    q, k, v, mask = (t.to("meta") for t in _qkv_mask())
    out = window_attention(q, k, v, mask)
    assert out.device.type == "meta" and out.shape == q.shape
