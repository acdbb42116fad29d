"""Building blocks of the SUNDAE prior: 2D axial rotary embedding, attention, feed-forward,
pre-norm transformer blocks and the two attention-resampling blocks of the hourglass.

Positions. Every token has a 2D position in *full-resolution token units*: a token at level
stride ``S`` (``S = 1`` on the input grid, ``S = s`` one level down, ...) with index ``(i, j)``
sits at the centre of the ``S × S`` block of fine tokens it summarises,
``(i·S + (S-1)/2, j·S + (S-1)/2)``. Rotary frequencies are fixed numbers
(``base^(-k/n)`` radians per fine token), independent of the grid size, so a prior trained on
16×16 runs unchanged on 20×12. RoPE scores depend only on position *differences*, so blocks
that attend inside small windows (the resampling blocks) may use window-local coordinates.

einops axis legend:
    b batch · h, w grid rows / columns at the current level · n tokens (h·w) · d model width ·
    heads attention heads · e head width (dim_head) · hc, wc coarse grid · s1, s2 offsets inside
    an s×s patch · k keys of one resampling window · c projected keys and values (2·heads·e)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

RotaryTables = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [n, e] float32


# --------------------------------------------------------------------------------------------
# cancel inside a forward
# --------------------------------------------------------------------------------------------

# The check installed by ``interrupt_check`` for the current thread / task. A forward of a large
# grid can take minutes on a CPU, so "cancel between sampler steps" is not enough: the prior
# calls the check before every transformer block, between its attention and feed-forward, and
# at every hourglass level. A context variable (not a module argument) keeps the forward
# signature unchanged; with no check installed the forward computes exactly what it did before,
# with no host syncs.
_interrupt_check: ContextVar[Callable[[], None] | None] = ContextVar("sundae_interrupt_check",
                                                                     default=None)


@contextlib.contextmanager
def interrupt_check(check: Callable[[], None] | None) -> Iterator[None]:
    """Install ``check()`` for the duration of the ``with`` block: every prior forward in this
    thread calls it between transformer blocks and hourglass levels; an exception it raises
    (e.g. the host application's "cancelled") stops the forward there and propagates. ``None``
    installs nothing. Nesting restores the outer check on exit."""
    if check is not None and not callable(check):
        raise ValueError(f"interrupt_check: check must be a callable() or None, got {check!r}")
    token = _interrupt_check.set(check)
    try:
        yield
    finally:
        _interrupt_check.reset(token)


# multiply-adds between two checks inside one layer on a CPU (~0.3-1 s on one core): at very large
# grids (65536 tokens at 4096 px, f16) one attention or logits matmul runs for minutes
CHUNK_MACS = 2**31
CHUNK_MIN_ROWS = 16  # single-query attention takes another CPU kernel path (other last bits)


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, macs_per_row: int) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` (each row of dim -2 computed on its own: a Linear, an FF,
    attention queries against fixed keys). With an interrupt check installed, on the CPU, and
    more than ``CHUNK_MACS`` multiply-adds in all, the rows go through in chunks with a check
    between them. The numbers stay the same bits on the CPUs we tested (their kernels compute
    rows independently; single-row attention does not, hence ``CHUNK_MIN_ROWS``); the test
    ``test_long_layers_are_split_for_cancel_with_the_same_numbers`` checks it. Otherwise (no
    check, another device, under ``torch.compile``) exactly ``fn(x)``."""
    n = x.shape[-2]
    if x.device.type != "cpu" or torch.compiler.is_compiling() or _interrupt_check.get() is None:
        return fn(x)
    rows = max(CHUNK_MIN_ROWS, CHUNK_MACS // max(1, macs_per_row))
    if rows >= n:
        return fn(x)
    parts = []
    for i in range(0, n, rows):
        check_interrupt()
        parts.append(fn(x[..., i : i + rows, :]))
    return torch.cat(parts, dim=-2)


def check_interrupt() -> None:
    """Call the installed interrupt check, if any (a no-op otherwise, and inside code traced by
    ``torch.compile``, which cannot trace a context variable: the training objective compiles
    into whole graphs, without a break at every block)."""
    if torch.compiler.is_compiling():
        return
    check = _interrupt_check.get()
    if check is not None:
        check()


# --------------------------------------------------------------------------------------------
# 2D axial rotary embedding
# --------------------------------------------------------------------------------------------


class Rotary2D:
    """Per-head 2D axial RoPE (a plain object: no parameters, nothing in the state dict).

    Of the ``e = dim_head`` channels of every head, the first ``e/2`` form ``e/4`` rotation
    pairs that encode the row, the other ``e/2`` encode the column ("half rows, half columns").
    Pairs are (c, c + e/2) in the rotate-half convention. Frequency k (k = 0..e/4-1) is
    ``base^(-k/(e/4))`` radians per fine token: the fastest turns once per ~6 tokens, the
    slowest once per ``2π·base`` tokens.
    """

    def __init__(self, dim_head: int, base: float) -> None:
        if dim_head % 4:
            raise ValueError(f"2D rotary needs dim_head divisible by 4, got {dim_head}")
        self.dim_head = dim_head
        self.base = float(base)

    def frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        n = self.dim_head // 4
        return self.base ** (-torch.arange(n, device=device, dtype=torch.float32) / n)

    def tables(self, pos_y: torch.Tensor, pos_x: torch.Tensor) -> RotaryTables:
        """cos/sin tables ``[n, e]`` for points at float positions ``pos_y, pos_x: [n]``."""
        freqs = self.frequencies(pos_y.device)
        angles = torch.cat([pos_y[:, None] * freqs, pos_x[:, None] * freqs], dim=-1)  # [n, e/2]
        angles = torch.cat([angles, angles], dim=-1)  # channel c and c + e/2 share an angle
        return angles.cos(), angles.sin()

    def grid(self, h: int, w: int, *, stride: int, device: torch.device) -> RotaryTables:
        """Tables for a raster-ordered ``h × w`` grid of tokens at level stride ``stride``."""
        pos_y, pos_x = grid_positions(h, w, stride=stride, device=device)
        return self.tables(pos_y, pos_x)


# largest table (positions × dim_head) ``FixedRotary`` keeps for a Stack's trained grid: 4 MiB
# per fp32 table, enough for 128×128 tokens at dim_head 64; larger grids compute per forward
FIXED_TABLE_MAX = 1 << 20


class FixedRotary(nn.Module):
    """The cos/sin tables of a fixed set of points, computed once and kept as buffers.

    A table depends only on the positions, so recomputing it every forward is waste; under
    ``torch.compile`` it is worse: inductor fuses the table's ``cos``/``sin`` into the kernels
    that rotate q and k and evaluates them for every element of q and k (batch × heads times
    over), where buffers become constants that the kernels just load (and that inductor's
    freezing folds).

    The buffers are non-persistent (nothing in the state dict: checkpoints are unchanged) and
    always float32 and exact: after every ``.to()`` / ``.cuda()`` / ``.half()`` / ``.bfloat16()``
    they are recomputed in float32 on the module's new device (a cast to bf16 and back must not
    round them), by the same code as an uncached table, so both are equal to the bit."""

    def __init__(self, rotary: Rotary2D, pos_y, pos_x) -> None:
        super().__init__()
        self.rotary = rotary
        # Python floats (multiples of 1/2 here: exact in float32)
        self.positions = ([float(v) for v in pos_y], [float(v) for v in pos_x])
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._fill(torch.empty(0).device)  # the default device (torch.device(...) contexts)

    def _fill(self, device: torch.device) -> None:
        pos_y, pos_x = (torch.tensor(p, dtype=torch.float32, device=device) for p in self.positions)
        self.cos, self.sin = self.rotary.tables(pos_y, pos_x)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._fill(self.cos.device)
        return self

    def forward(self) -> RotaryTables:
        return self.cos, self.sin


def grid_position_list(h: int, w: int, *, stride: int) -> tuple[list[float], list[float]]:
    """``grid_positions`` as Python floats (no tensors: also right while a model is built on the
    meta device); the values are multiples of 1/2, exact in float32, so tables made from them
    equal ``grid_positions``' to the bit."""
    centre = (stride - 1) / 2
    return ([i * stride + centre for i in range(h) for _ in range(w)],
            [j * stride + centre for _ in range(h) for j in range(w)])


def grid_positions(h: int, w: int, *, stride: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution centres of an ``h × w`` grid at level stride ``stride``: two ``[h·w]``
    float tensors (rows, columns) in raster order."""
    centre = (stride - 1) / 2
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride + centre
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride + centre
    return repeat(ys, "h -> (h w)", w=w), repeat(xs, "w -> (h w)", h=h)


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotate ``x: [..., n, e]`` by the angles of ``tables`` (``[n, e]`` each)."""
    cos, sin = (t.to(x.dtype) for t in tables)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# --------------------------------------------------------------------------------------------
# attention, feed-forward, blocks
# --------------------------------------------------------------------------------------------


# Attention over at most this many keys is computed by ``window_attention``: the resampling
# windows (s² = 4 fine tokens per coarse one at s = 2, 9 coarse neighbours per fine token), and
# self-attention over a grid level of at most 16 tokens (a small grid's valley); longer key sets
# go to ``F.scaled_dot_product_attention``.
WINDOW_KEYS = 16
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")  # where window_attention switches autocast off


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None, *, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention written out, for short key sets (``WINDOW_KEYS``): mostly the many tiny
    groups of the resampling blocks (``[b·hc·wc, heads, s² or 1 queries, ≤ 9 or s² keys]``). On the CPU ``scaled_dot_product_attention``
    takes its flash kernel there, built for long sequences: a 3×3-window call of the small
    preset took 1.7 ms for ~10 MFLOP (2-core AMX Xeon, bf16); written out, it is a few small
    batched matmuls (and, under ``torch.compile``, one fused kernel). Scores, softmax and the
    weighted sum are computed in float32 whatever the input dtype and autocast (as SDPA
    accumulates), then cast back. q [..., n, e], k / v [..., m, e], mask bool broadcastable to [..., n, m] (True =
    may attend; every query must keep at least one key) -> [..., n, e]."""
    # autocast off: under bf16 / fp16 autocast (training) the matmuls would round the scores to
    # half precision before the softmax. Only where autocast exists: torch.autocast raises even
    # with enabled=False on devices without it (DirectML, MPS before torch 2.5, meta).
    device = q.device.type
    guard = (torch.autocast(device, enabled=False) if device in _AUTOCAST_DEVICES
             else contextlib.nullcontext())
    with guard:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        if dropout_p > 0:
            weights = F.dropout(weights, dropout_p)
        return torch.matmul(weights, v.float()).to(v.dtype)


class Attention(nn.Module):
    """Multi-head attention (non-causal): ``F.scaled_dot_product_attention``, or
    :func:`window_attention` for key sets of at most ``WINDOW_KEYS`` (the resampling windows).

    Width ``I = heads · dim_head`` may differ from ``dim`` (the paper used I = 512 at D = 1024).
    Rotary is applied to q and k *after* the head split, so every head sees positions (the
    official code rotated the first 64 channels before the split: head 0 only, bug B2 in
    docs/official-code.md).
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def _project(self, x: torch.Tensor, context: torch.Tensor | None, kv):
        """q [b, n, I] from x; k, v [b, m, I] from ``context`` (``x`` when None), or ``kv``
        as given (already projected).

        Self-attention compiled for inference (``compile_prior``) projects q, k and v in one
        matmul against ``[to_q; to_kv]``: inductor's freezing folds the ``cat`` of the two
        weights into one constant, and one wider matmul reads ``x`` once. On the 2-core AMX Xeon
        we measured, a prepacked ``[1024, 1024] × [1024, 1536]`` bf16 matmul took ~60% of the
        time of the two it replaces (benchmarks/RESULTS.md "Fused projections"). Eagerly the
        ``cat`` would be a weight copy per call (so would it be in a graph compiled without
        freezing: correct, only not faster), and training keeps the separate projections: there
        both stay two matmuls (same numbers either way, up to float rounding). The fused matmul
        reads the two weights directly, so hooks on ``to_q`` / ``to_kv`` do not run in it."""
        if kv is not None:
            return (self.to_q(x), *kv)
        if context is None and not torch.is_grad_enabled() and torch.compiler.is_compiling():
            return F.linear(x, torch.cat([self.to_q.weight, self.to_kv.weight])).chunk(3, dim=-1)
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        return self.to_q(x), k, v

    def heads_output(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        rot_q: RotaryTables | None = None,
        rot_k: RotaryTables | None = None,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-head attention output before the output projection.

        x: [b, n, d] queries; context: [b, m, d] keys/values (default ``x``); kv: instead of
        ``context``, keys and values already projected by ``to_kv`` (``[b, m, I]`` each; the
        3×3-window resampling projects each coarse token once, not once per window); rot_q /
        rot_k: rotary tables for the n queries / m keys; mask: bool, broadcastable to
        [b, heads, n, m], True = may attend. Returns [b, heads, n, e].
        """
        q, k, v = (rearrange(t, "b n (heads e) -> b heads n e", heads=self.heads)
                   for t in self._project(x, context, kv))
        if rot_q is not None:
            q = apply_rotary(q, rot_q)
        if rot_k is not None:
            k = apply_rotary(k, rot_k)
        p = self.dropout if self.training else 0.0
        if k.shape[-2] <= WINDOW_KEYS:
            return window_attention(q, k, v, mask, dropout_p=p)
        if mask is not None or p > 0:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, heads, _, e = q.shape
        return rowwise(lambda qc: F.scaled_dot_product_attention(qc, k, v), q,
                       macs_per_row=2 * b * heads * k.shape[-2] * e)

    def forward(self, x, context=None, *, rot_q=None, rot_k=None, mask=None, kv=None) -> torch.Tensor:
        out = self.heads_output(x, context, rot_q=rot_q, rot_k=rot_k, mask=mask, kv=kv)
        return self.to_out(rearrange(out, "b heads n e -> b n (heads e)"))


class FeedForward(nn.Module):
    """Linear(d → mult·d) → exact GELU → dropout → Linear(mult·d → d), as in the paper."""

    def __init__(self, dim: int, *, mult: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult)
        self.drop = nn.Dropout(dropout)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.drop(F.gelu(self.proj_in(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN x); x += FF(LN x). x: [b, n, d]."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, ff_mult: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rot: RotaryTables) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rot_q=rot, rot_k=rot))
        check_interrupt()  # attention and FF each take ~1 s at 4096 tokens, D 1024, on a CPU
        b, _, d = x.shape
        hidden = self.ff.proj_in.out_features
        return x + self.drop(rowwise(lambda xc: self.ff(self.ff_norm(xc)), x, macs_per_row=2 * b * d * hidden))


class Stack(nn.Module):
    """``depth`` blocks of full self-attention over one grid level at stride ``stride``.

    forward: x [b, h, w, d] -> [b, h, w, d]; depth 0 is the identity.
    """

    def __init__(self, depth: int, *, stride: int, rotary: Rotary2D,
                 size: tuple[int, int] | None = None, **block_kwargs) -> None:
        """``size``: the ``(h, w)`` this level sees at the prior's trained grid; its rotary
        table is kept (``FixedRotary``), other sizes compute theirs per forward."""
        super().__init__()
        self.stride = stride
        self.rotary = rotary
        self.layers = nn.ModuleList(Block(**block_kwargs) for _ in range(depth))
        self.size = None
        self.table = None
        if depth and size is not None and size[0] * size[1] * rotary.dim_head <= FIXED_TABLE_MAX:
            self.size = (int(size[0]), int(size[1]))
            self.table = FixedRotary(rotary, *grid_position_list(*self.size, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.layers) == 0:
            return x
        _, h, w, _ = x.shape
        if self.table is not None and (h, w) == self.size:
            rot = self.table()
        else:
            rot = self.rotary.grid(h, w, stride=self.stride, device=x.device)
        x = rearrange(x, "b h w d -> b (h w) d")
        for layer in self.layers:
            check_interrupt()
            x = layer(x, rot)
        return rearrange(x, "b (h w) d -> b h w d", h=h, w=w)


# --------------------------------------------------------------------------------------------
# attention resampling (hourglass shortening / upsampling helpers)
# --------------------------------------------------------------------------------------------


class _ResampleBlock(nn.Module):
    """Shared parts of both resampling blocks: queries and context are normed separately
    (the official code fed the context un-normalised), then a pre-norm FF."""

    def __init__(self, dim: int, *, factor: int, heads: int, dim_head: int, ff_mult: int,
                 dropout: float, stride: int, rotary: Rotary2D) -> None:
        super().__init__()
        self.factor = factor
        self.stride = stride  # stride of the *fine* level
        self.rotary = rotary
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        # window-local positions (RoPE is relative): the s×s fine tokens of a patch at s1·S
        # (ResampleDown's keys, ResampleUp's queries), the other side's table in the subclass
        fy, fx = grid_position_list(factor, factor, stride=1)
        self.rot_fine = FixedRotary(rotary, [y * stride for y in fy], [x * stride for x in fx])

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.ff(self.ff_norm(x)))


class ResampleDown(_ResampleBlock):
    """Pre-valley resampling: each coarse token (one query) attends to exactly the ``s × s``
    fine tokens of *its own* 2D patch — the same patch the linear space-to-depth projection
    merged (the official code used 4 consecutive raster tokens, a 1×4 strip: bug B1 in
    docs/official-code.md).

    Fine tokens that are only padding (grid not divisible by s) are masked out.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        centre = (self.factor - 1) / 2 * self.stride  # the query, at the patch centre
        self.rot_centre = FixedRotary(self.rotary, [centre], [centre])

    def patch_attention(self, coarse: torch.Tensor, fine: torch.Tensor, size: tuple[int, int]):
        """The attention term alone: coarse [b, hc, wc, d], fine [b, hc·s, wc·s, d] (padded),
        ``size`` = real (h, w) of the fine grid. Returns [b, hc, wc, d]."""
        s = self.factor
        b, hc, wc, _ = coarse.shape
        q = rearrange(self.norm_q(coarse), "b hc wc d -> (b hc wc) 1 d")
        kv = rearrange(self.norm_kv(fine), "b (hc s1) (wc s2) d -> (b hc wc) (s1 s2) d", s1=s, s2=s)
        # window-local positions (RoPE is relative): keys at s1·S, query at the patch centre
        rot_k, rot_q = self.rot_fine(), self.rot_centre()
        mask = None
        h, w = size
        if h != hc * s or w != wc * s:  # some patches hold padding: hide it
            rows = torch.arange(hc * s, device=coarse.device) < h
            cols = torch.arange(wc * s, device=coarse.device) < w
            valid = rows[:, None] & cols[None, :]
            mask = repeat(valid, "(hc s1) (wc s2) -> (b hc wc) 1 1 (s1 s2)", s1=s, s2=s, b=b)
        out = self.attn(q, kv, rot_q=rot_q, rot_k=rot_k, mask=mask)
        return rearrange(out, "(b hc wc) 1 d -> b hc wc d", b=b, hc=hc, wc=wc)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor, size: tuple[int, int]):
        """coarse [b, hc, wc, d] (after the down projection), fine [b, hc·s, wc·s, d] (padded)
        -> coarse [b, hc, wc, d]."""
        x = coarse + self.drop(self.patch_attention(coarse, fine, size))
        return self._finish(x)


class ResampleUp(_ResampleBlock):
    """Post-valley resampling: each fine token attends to the 3×3 coarse neighbourhood around
    its parent (9 keys, fewer at the border, masked).

    The official block gave each fine token a single key, so its softmax was identically 1
    and its q/k projections never learned (bug B3, docs/official-code.md). With a 3×3 window
    the block can choose between the parent and its neighbours, e.g. to sharpen patch
    boundaries. The window is the parent's: all ``s × s`` fine tokens of one patch share it,
    which keeps the attention a batched ``(b hc wc)``-group call with no gather.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # the keys: neighbour centres at (dy·s + (s-1)/2)·S, in the order of neighbour_attention's
        # offsets (dy outer, dx inner, each -1, 0, 1)
        s, st, centre = self.factor, self.stride, (self.factor - 1) / 2
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        self.rot_neighbours = FixedRotary(self.rotary, [(dy * s + centre) * st for dy, _ in offsets],
                                          [(dx * s + centre) * st for _, dx in offsets])

    def neighbour_attention(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """The attention term alone: fine [b, hc·s, wc·s, d] queries, coarse [b, hc, wc, d]
        context. Returns [b, hc·s, wc·s, d]."""
        s = self.factor
        b, hc, wc, _ = coarse.shape
        q = rearrange(self.norm_q(fine), "b (hc s1) (wc s2) d -> (b hc wc) (s1 s2) d", s1=s, s2=s)
        # keys and values of every coarse token, projected once (not once per window it is in:
        # 9x fewer rows); a zero ring around the grid stands for the missing neighbours, masked
        # below (to_kv has no bias, so zero features would have projected to zeros too)
        kv = F.pad(self.attn.to_kv(self.norm_kv(coarse)), (0, 0, 1, 1, 1, 1))
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        windows = torch.stack(
            [kv[:, 1 + dy : 1 + dy + hc, 1 + dx : 1 + dx + wc] for dy, dx in offsets], dim=3
        )
        k, v = rearrange(windows, "b hc wc k c -> (b hc wc) k c").chunk(2, dim=-1)
        dev = coarse.device
        # [k=9, 2] integer (dy, dx) in the order of `offsets`, built on the device: a
        # torch.tensor(list, device=cuda) here would be a blocking host->device copy per forward
        d = torch.arange(-1, 2, device=dev)
        off = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1).reshape(9, 2)
        rows = torch.arange(hc, device=dev)[:, None] + off[None, :, 0]  # [hc, 9]
        cols = torch.arange(wc, device=dev)[:, None] + off[None, :, 1]  # [wc, 9]
        valid_r = (rows >= 0) & (rows < hc)
        valid_c = (cols >= 0) & (cols < wc)
        valid = valid_r[:, None, :] & valid_c[None, :, :]  # [hc, wc, 9]: neighbour inside grid
        mask = repeat(valid, "hc wc k -> (b hc wc) 1 1 k", b=b)
        # window-local positions: fine tokens at s1·S; neighbour centres at (dy·s + (s-1)/2)·S
        rot_q, rot_k = self.rot_fine(), self.rot_neighbours()
        out = self.attn(q, kv=(k, v), rot_q=rot_q, rot_k=rot_k, mask=mask)
        return rearrange(out, "(b hc wc) (s1 s2) d -> b (hc s1) (wc s2) d", b=b, hc=hc, wc=wc,
                         s1=s, s2=s)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """fine [b, hc·s, wc·s, d] (upsampled + skip, padded), coarse [b, hc, wc, d] (valley
        output) -> fine [b, hc·s, wc·s, d]."""
        x = fine + self.drop(self.neighbour_attention(fine, coarse))
        return self._finish(x)


def scaled_init_(module: nn.Module, *, num_blocks: int) -> None:
    """GPT-2 style init: Linear and Embedding weights N(0, 0.02), biases 0; the projections
    that write into the residual stream (attention ``to_out``, FF ``proj_out``) N(0, 0.02 /
    sqrt(2·num_blocks)), so the stream's variance does not grow with depth."""
    out_std = 0.02 / math.sqrt(2 * max(num_blocks, 1))
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = out_std if name.endswith(("to_out", "proj_out")) else 0.02
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
