"""The SUNDAE prior: a 2D-aware hourglass transformer over a grid of VQ-GAN tokens.

``SundaePrior(config)(tokens [b, h, w] int64, labels [b] | None) -> logits [b, h, w, k]``,
non-causal, for any grid ``h × w`` (square or not, odd or even). Architecture after
McKinney & Willcocks 2022 (official code: ``vvvm23/sundae-vqgan``) with its bugs fixed
(docs/official-code.md lists them by tag, B1–B18):

    token embedding (+ class embedding, added at every position)
    body = Stack(depth)                          # int depth: a flat transformer
         | Hourglass((pre, inner, post))         # tuple depth: one level per nesting
               pre blocks at the fine grid ─────────────── skip ──┐
               pad to a multiple of s, space-to-depth s×s, Linear │
               [ResampleDown: coarse token attends to its s×s patch]
               inner = Stack(valley) | Hourglass(...)             │
               Linear, depth-to-space s×s, + skip ◄───────────────┘
               [ResampleUp: fine token attends to the 3×3 coarse neighbours of its parent]
               crop to the real grid, post blocks
    final LayerNorm, Linear -> logits over the codebook

einops axis legend: b batch · h, w grid rows / columns · d model width · hc, wc coarse grid ·
s1, s2 offsets inside an s×s patch · k codebook.

Paper vs ours (all deliberate):

* shortening is ``s`` **per axis** (``shorten_factor = 2`` = the paper's "s = 4" 2×2 merge);
  levels nest (``depth = (2, (2, 8, 2), 2)``), the paper had one level;
* attention width ``I = heads · dim_head``; ``dim_head = None`` (the default) means
  ``I = dim`` (as the 2023 JAX port). The paper presets set ``dim_head = 64`` (I = 512 at
  D = 1024) to reproduce the paper's widths and parameter counts;
* 2D rotary on every head after the head split (B2), positions consistent across levels and
  grid-size independent frequencies (B4), explicit ``(h, w)`` with padding (B5, B6);
* resampling windows are the exact 2D patch (B1) and the post-valley block has ≥ 2 keys (B3);
* a null class (index ``num_classes``) for classifier-free guidance; label ``-1`` = null;
* GPT-2 style init instead of PyTorch defaults; the resampling context is layer-normed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._helpers import (
    META_CONFIG,
    META_FORMAT_VERSION,
    META_MODEL_TYPE,
    config_to_json,
    hf_download,
    is_hf_source,
    load_native_model,
    parse_hf_source,
    resolve_local,
    resolve_shipped,
    save_native,
    unwrap,
)
from .checks import check_bool, check_int, check_number, check_tokens, is_int
from .config_dict import config_from_dict, config_property
from .labels import resolve_labels as _resolve_labels
from .layers import (
    ResampleDown,
    ResampleUp,
    Rotary2D,
    Stack,
    check_interrupt,
    rowwise,
    scaled_init_,
)

logger = logging.getLogger(__name__)

MODEL_TYPE = "sundae_prior"
Depth = int | tuple  # int, or (pre: int, inner: Depth, post: int)

# Config limits, far above any published model (paper: 32×32 tokens, 16 blocks, 1 level); a
# file beyond them is refused when read instead of failing (or exhausting memory) later.
MAX_GRID_SIDE = 1024  # tokens per side of the trained grid
MAX_BLOCKS = 512  # self-attention blocks in total
MAX_LEVELS = 8  # nested shortening levels

# Parameter counts below: ours [the official config's, docs/official-code.md "Paper
# configurations"]. Ours differ by the null class row, the extra LayerNorm on the resampling
# context and bias details: < 0.1 %.
_PRESETS: dict[str, dict[str, Any]] = {
    # FFHQ 256² through the taming f16 VQ-GAN: 16×16 tokens; 178.4M [178.4M]
    "ffhq256": dict(codebook_size=1024, grid=(16, 16), dim=1024, heads=8, dim_head=64,
                    depth=(2, 10, 2)),
    # FFHQ 1024² through an f32 VQ-GAN: 32×32 tokens; the D 1024 (2,12,2) model that fits the
    # "~2 s per 1024² image on a 1080Ti" claim; 214.1M [214.1M]
    "ffhq1024": dict(codebook_size=8192, grid=(32, 32), dim=1024, heads=8, dim_head=64,
                     depth=(2, 12, 2)),
    # class-conditional ImageNet 256² (taming f16, 1024 codes); 200.4M [200.4M]
    "imagenet256": dict(codebook_size=1024, grid=(16, 16), num_classes=1000, dim=1024,
                        heads=8, dim_head=64, depth=(2, 12, 2)),
    # the paper's MNIST pixel prior: 256 grey levels as tokens, 28×28, 10 classes; 155.9M
    # [155.9M]. For CPU training override the width, e.g. preset("mnist-pixels", dim=256).
    "mnist-pixels": dict(codebook_size=256, grid=(28, 28), num_classes=10, dim=1024, heads=8,
                         dim_head=64, depth=(2, 8, 2)),
    # a small prior for experiments on one GPU or a patient CPU; 12.1M
    "small": dict(codebook_size=1024, grid=(16, 16), dim=256, heads=4, depth=(2, 8, 2)),
    # for tests; ~50k parameters
    "tiny": dict(codebook_size=16, grid=(8, 8), dim=32, heads=2, depth=(1, 1, 1), ff_mult=2),
}


@dataclass
class PriorConfig:
    """Everything that rebuilds a :class:`SundaePrior` (stored as JSON in the model file).

    Fields:
        codebook_size: number of token values ``k`` (the VQ-GAN's ``n_embed``).
        grid: the trained ``(h, w)`` token grid (the sampler's default size; any grid runs).
        num_classes: 0 = unconditional, else labels ``0..num_classes-1``.
        null_class: a conditional prior gets an extra "null" class at index ``num_classes``
            (label ``-1``) for classifier-free guidance.
        class_dropout: training probability of replacing a label by the null class (read by
            ``sundae_loss``; needs ``null_class``).
        dim: model width ``D``. heads: attention heads. dim_head: head width ``e``;
            ``None`` = ``dim // heads`` (attention width I = D); must be divisible by 4
            (2D rotary: half the channels rows, half columns, in pairs).
        depth: ``int`` = flat transformer of that many blocks (no shortening), or
            ``(pre, inner, post)`` where ``inner`` is an int (valley blocks) or another
            ``(pre, inner, post)`` for a further level. ``(2, 10, 2)`` = the paper.
        shorten_factor: ``s``, per axis: each level merges ``s × s`` patches (2 = the paper).
        attn_resampling: add the attention-resampling blocks around each valley (paper: on).
        ff_mult: feed-forward hidden width = ``ff_mult · dim``. dropout: everywhere (0 = paper).
        rotary_base: slowest rotary frequency is ``1/rotary_base`` rad per fine token.
    """

    codebook_size: int = 1024
    grid: tuple[int, int] = (16, 16)
    num_classes: int = 0
    null_class: bool = True
    class_dropout: float = 0.1
    dim: int = 512
    heads: int = 8
    dim_head: int | None = None
    depth: Depth = (2, 8, 2)
    shorten_factor: int = 2
    attn_resampling: bool = True
    ff_mult: int = 4
    dropout: float = 0.0
    rotary_base: float = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.grid, list):
            self.grid = tuple(self.grid)
        self.depth = _tupleize_depth(self.depth)
        for name in ("codebook_size", "dim", "heads", "shorten_factor", "ff_mult"):
            check_int(getattr(self, name), f"PriorConfig.{name}", minimum=1)
        if self.codebook_size < 2:
            raise ValueError(f"PriorConfig.codebook_size must be >= 2, got {self.codebook_size}")
        if self.shorten_factor < 2:
            raise ValueError(
                f"PriorConfig.shorten_factor must be >= 2 (patches of s×s tokens per level), got "
                f"{self.shorten_factor}; for no shortening use an int depth (flat transformer)"
            )
        if (not isinstance(self.grid, tuple) or len(self.grid) != 2
                or not all(is_int(v) and v >= 1 for v in self.grid)):
            raise ValueError(f"PriorConfig.grid must be (h, w) with h, w >= 1, got {self.grid!r}")
        if max(self.grid) > MAX_GRID_SIDE:
            raise ValueError(
                f"PriorConfig.grid {list(self.grid)} exceeds the limit of {MAX_GRID_SIDE} tokens per "
                f"side (MAX_GRID_SIDE); use a grid of at most {MAX_GRID_SIDE}x{MAX_GRID_SIDE} (a "
                "prior samples other sizes too, this is only the trained grid)"
            )
        check_int(self.num_classes, "PriorConfig.num_classes", minimum=0,
                  hint="0 = unconditional")
        for name in ("null_class", "attn_resampling"):
            check_bool(getattr(self, name), f"PriorConfig.{name}")
        for name in ("class_dropout", "dropout"):
            check_number(getattr(self, name), f"PriorConfig.{name}", low=0, high=1, high_open=True)
        if self.num_classes and self.class_dropout > 0 and not self.null_class:
            raise ValueError(
                f"PriorConfig.class_dropout={self.class_dropout} needs null_class=True (dropped "
                "labels are replaced by the null class); set class_dropout=0 or null_class=True"
            )
        if self.dim_head is None:
            if self.dim % self.heads:
                raise ValueError(
                    f"PriorConfig: heads={self.heads} does not divide dim={self.dim}; pick heads "
                    "that divide dim or set dim_head explicitly"
                )
        else:
            check_int(self.dim_head, "PriorConfig.dim_head", minimum=1,
                      hint="or null for dim // heads")
        if self.head_dim % 4:
            raise ValueError(
                f"PriorConfig: head width {self.head_dim} (dim_head, or dim/heads) must be "
                "divisible by 4 for 2D rotary (half the channels rows, half columns, in pairs)"
            )
        check_number(self.rotary_base, "PriorConfig.rotary_base", low=1, low_open=True)
        _validate_depth(self.depth, "depth")
        if self.levels > MAX_LEVELS or self.num_blocks > MAX_BLOCKS:
            raise ValueError(
                f"PriorConfig.depth {self.depth!r} has {self.num_blocks} blocks in {self.levels} "
                f"levels; the limits are {MAX_BLOCKS} blocks (MAX_BLOCKS) and {MAX_LEVELS} levels "
                "(MAX_LEVELS) — use a smaller depth"
            )

    # ---- derived quantities ----------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """Head width ``e`` (``dim_head`` or ``dim // heads``)."""
        return self.dim_head if self.dim_head is not None else self.dim // self.heads

    @property
    def levels(self) -> int:
        """Number of shortening levels (0 = flat transformer)."""
        n, d = 0, self.depth
        while isinstance(d, tuple):
            n, d = n + 1, d[1]
        return n

    @property
    def num_blocks(self) -> int:
        """Self-attention blocks in total (resampling blocks not counted)."""
        return _count_blocks(self.depth)

    # ---- construction helpers --------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PriorConfig:
        """A named configuration (``ffhq256``, ``ffhq1024``, ``imagenet256``, ``mnist-pixels``,
        ``small``, ``tiny``) with fields overridden by keyword (unknown fields are rejected)."""
        if name not in _PRESETS:
            raise ValueError(
                f"unknown PriorConfig preset {name!r}; available presets: {sorted(_PRESETS)}"
            )
        return config_from_dict(cls, {**_PRESETS[name], **overrides},
                                what=f"PriorConfig.preset({name!r})")

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorConfig:
        """Strict: unknown keys raise ``ValueError`` listing the valid ones."""
        return config_from_dict(cls, data)

    def to_json(self) -> str:
        return config_to_json(self)


def _tupleize_depth(depth: Any) -> Any:
    if isinstance(depth, list):
        return tuple(_tupleize_depth(d) for d in depth)
    return depth


def _validate_depth(depth: Any, where: str) -> None:
    hint = ("use an int (flat transformer) or (pre, inner, post) with pre/post >= 0 and inner "
            "an int >= 1 or another (pre, inner, post), e.g. (2, 10, 2) or (2, (2, 8, 2), 2)")
    if where.count("[") >= MAX_LEVELS:
        raise ValueError(f"PriorConfig.{where}: depth nests more than {MAX_LEVELS} levels "
                         f"(MAX_LEVELS); {hint}")
    if is_int(depth):
        if depth < 1:
            raise ValueError(f"PriorConfig.{where} must be >= 1 blocks, got {depth}; {hint}")
        return
    if not isinstance(depth, tuple) or len(depth) != 3:
        raise ValueError(f"PriorConfig.{where} = {depth!r} is not a valid depth; {hint}")
    pre, inner, post = depth
    for label, value in (("pre", pre), ("post", post)):
        if not is_int(value) or value < 0:
            raise ValueError(f"PriorConfig.{where}: {label} = {value!r} must be an int >= 0; {hint}")
    _validate_depth(inner, f"{where}[1]")


def _count_blocks(depth: Depth) -> int:
    if isinstance(depth, int):
        return depth
    return depth[0] + _count_blocks(depth[1]) + depth[2]


def _count_resampling(depth: Depth) -> int:
    return 0 if isinstance(depth, int) else 2 + _count_resampling(depth[1])


# --------------------------------------------------------------------------------------------
# the hourglass
# --------------------------------------------------------------------------------------------


class Hourglass(nn.Module):
    """One shortening level: ``pre`` blocks, s×s space-to-depth, inner level, depth-to-space,
    U-Net skip, ``post`` blocks. forward: x [b, h, w, d] -> [b, h, w, d], any h, w >= 1."""

    def __init__(self, depth: tuple, *, stride: int, config: PriorConfig, rotary: Rotary2D,
                 size: tuple[int, int]):
        """``size``: this level's ``(h, w)`` at the trained grid (the Stacks keep its rotary
        tables; any other size still runs)."""
        super().__init__()
        pre, inner, post = depth
        s, d = config.shorten_factor, config.dim
        block = dict(dim=d, heads=config.heads, dim_head=config.head_dim,
                     ff_mult=config.ff_mult, dropout=config.dropout)
        self.factor = s
        coarse_size = (-(-size[0] // s), -(-size[1] // s))
        self.pre = Stack(pre, stride=stride, rotary=rotary, size=size, **block)
        # feature order (d s1 s2) = channel-major, as the official (channel, dy, dx)
        self.down = nn.Linear(s * s * d, d)
        self.up = nn.Linear(d, s * s * d)
        if config.attn_resampling:
            rs = dict(block, factor=s, stride=stride, rotary=rotary)
            self.resample_down = ResampleDown(**rs)
            self.resample_up = ResampleUp(**rs)
        else:
            self.resample_down = self.resample_up = None
        if isinstance(inner, tuple):
            self.valley = Hourglass(inner, stride=stride * s, config=config, rotary=rotary,
                                    size=coarse_size)
        else:
            self.valley = Stack(inner, stride=stride * s, rotary=rotary, size=coarse_size, **block)
        self.post = Stack(post, stride=stride, rotary=rotary, size=size, **block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.factor
        _, h, w, _ = x.shape
        x = self.pre(x)
        # pad bottom/right with zero features to a multiple of s; padding is masked out of
        # the resampling attention and cropped off before the post blocks
        pad_h, pad_w = (-h) % s, (-w) % s
        fine = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        coarse = self.down(rearrange(fine, "b (hc s1) (wc s2) d -> b hc wc (d s1 s2)", s1=s, s2=s))
        if self.resample_down is not None:
            coarse = self.resample_down(coarse, fine, (h, w))
        check_interrupt()  # between levels (Stack also checks between its blocks)
        coarse = self.valley(coarse)
        check_interrupt()
        up = rearrange(self.up(coarse), "b hc wc (d s1 s2) -> b (hc s1) (wc s2) d", s1=s, s2=s)
        up = up + fine  # U-Net skip (the pre output), after upsampling as in the paper
        if self.resample_up is not None:
            up = self.resample_up(up, coarse)
        return self.post(up[:, :h, :w])


# --------------------------------------------------------------------------------------------
# the prior
# --------------------------------------------------------------------------------------------


class SundaePrior(nn.Module):
    """SUNDAE denoiser ``p(z | z̃)``: logits for every token of a (corrupted) token grid.

    forward(tokens [b, h, w] integer in [0, codebook_size), labels [b] int64 | None)
        -> logits [b, h, w, codebook_size] (float; the autocast dtype under autocast).

    Labels: ``0..num_classes-1``; ``-1`` = the null class; ``None`` on a conditional prior =
    null class for the whole batch; an unconditional prior rejects labels.
    ``metadata`` holds the string header of the file it was loaded from (``{}`` otherwise).

    Cancel: inside ``layers.interrupt_check(fn)`` (or ``sample(..., check_interrupt=fn)``)
    the forward calls ``fn()`` before every transformer block and between its attention and
    feed-forward, around every hourglass level and before the logits; on a CPU, attention, FF
    and logits of a huge grid (more than ``layers.CHUNK_MACS`` multiply-adds) also go through in
    row chunks with a check between them (same results), so an exception from ``fn`` stops even
    a minutes-long step within about a second. With no check installed nothing extra runs.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        if not isinstance(config, PriorConfig):
            raise ValueError(f"SundaePrior needs a PriorConfig, got {type(config).__name__}; use "
                             "PriorConfig(...) or PriorConfig.preset(name)")
        self.config = config
        self.metadata: dict[str, str] = {}
        d = config.dim
        rotary = Rotary2D(config.head_dim, config.rotary_base)
        self.token_emb = nn.Embedding(config.codebook_size, d)
        if config.num_classes:
            self.class_emb = nn.Embedding(config.num_classes + int(config.null_class), d)
        else:
            self.class_emb = None
        if isinstance(config.depth, int):
            self.body = Stack(config.depth, stride=1, rotary=rotary, size=config.grid, dim=d,
                              heads=config.heads, dim_head=config.head_dim,
                              ff_mult=config.ff_mult, dropout=config.dropout)
        else:
            self.body = Hourglass(config.depth, stride=1, config=config, rotary=rotary,
                                  size=config.grid)
        self.norm_out = nn.LayerNorm(d)
        self.to_logits = nn.Linear(d, config.codebook_size)
        scaled_init_(self, num_blocks=config.num_blocks + _count_resampling(config.depth))
        for m in self.body.modules():  # scale-preserving init for the space/depth projections
            if isinstance(m, Hourglass):
                for lin in (m.down, m.up):
                    nn.init.normal_(lin.weight, std=lin.in_features**-0.5)

    # ---- properties -------------------------------------------------------------------------

    codebook_size = config_property("codebook_size", "Token vocabulary size K (int).")
    num_classes = config_property(
        "num_classes", "Real classes (int; 0 = unconditional), the null class not counted."
    )

    @property
    def has_null_class(self) -> bool:
        return self.config.num_classes > 0 and self.config.null_class

    @property
    def null_label(self) -> int | None:
        """Row of the null class in ``class_emb`` (``None`` when there is none). Callers pass
        ``-1`` as the label, not this index."""
        return self.config.num_classes if self.has_null_class else None

    @property
    def grid(self) -> tuple[int, int]:
        """The trained ``(h, w)`` (other grids work too)."""
        return tuple(self.config.grid)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- input checking ---------------------------------------------------------------------

    def check_tokens(self, tokens: Any) -> torch.Tensor:
        """Validate ``tokens: [b, h, w]`` integer in ``[0, codebook_size)``; returns int64."""
        return check_tokens(tokens, self.codebook_size, "SundaePrior", owner="this prior",
                            hint="pair the prior with the VQ-GAN it was trained on")

    def resolve_labels(self, labels: Any, batch_size: int, device=None) -> torch.Tensor | None:
        """Validate labels (ids, names of the file's label map, ``-1`` = null; see
        :func:`~.labels.resolve_labels`, the one resolver) and map ``-1`` to the null class:
        returns int64 ``[b]`` indices into the class table, or ``None`` for an unconditional
        prior."""
        t = _resolve_labels(self, labels, batch_size, device, "SundaePrior")
        if t is None:
            return None
        return torch.where(t < 0, torch.full_like(t, self.num_classes), t)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, *,
                validate: bool = True) -> torch.Tensor:
        """tokens [b, h, w] int64, labels [b] | None -> logits [b, h, w, codebook_size].

        ``validate=False`` skips the value-range checks of tokens and labels (each costs a host
        synchronisation); callers that validated once up front, like the sampler's step loop,
        use it. Labels must then already be int64 ``[b]`` with ``-1`` for the null class."""
        if validate:
            tokens = self.check_tokens(tokens)
            labels = self.resolve_labels(labels, tokens.shape[0], tokens.device)
        elif labels is not None:
            labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        elif self.num_classes:
            labels = torch.full((tokens.shape[0],), self.num_classes, dtype=torch.long,
                                device=tokens.device)
        x = self.token_emb(tokens)  # [b, h, w, d]
        if labels is not None:
            x = x + rearrange(self.class_emb(labels), "b d -> b 1 1 d")
        x = self.body(x)
        check_interrupt()  # the logits of a large grid are a big matmul of their own
        b, h, w, d = x.shape
        x = rearrange(self.norm_out(x), "b h w d -> b (h w) d")
        logits = rowwise(self.to_logits, x, macs_per_row=b * d * self.codebook_size)
        return rearrange(logits, "b (h w) k -> b h w k", h=h, w=w)


def forward_unchecked(prior: nn.Module, tokens: torch.Tensor,
                      labels: torch.Tensor | None) -> torch.Tensor:
    """``prior(tokens, labels)`` for inputs the caller validated once up front (int64 tokens in
    range; labels int64 ``[b]`` with ``-1`` = null, or None): a :class:`SundaePrior`, bare or
    behind DDP / ``torch.compile``, runs with ``validate=False`` (no host synchronisation per
    call); any other module (a test double) gets the plain call. The sampler's step loop and the
    objective's unroll use it."""
    if isinstance(unwrap(prior), SundaePrior):
        return prior(tokens, labels, validate=False)
    return prior(tokens, labels)


# --------------------------------------------------------------------------------------------
# native checkpoint I/O
# --------------------------------------------------------------------------------------------

_RESERVED_META = (META_MODEL_TYPE, META_FORMAT_VERSION, META_CONFIG)


def save_prior(prior: SundaePrior, path: str | os.PathLike,
               metadata: dict[str, str] | None = None) -> None:
    """Write ``prior`` as a native ``.safetensors`` file (atomic). Extra string ``metadata``
    (e.g. ``{"sundae.codec": "pixel:levels=256,channels=1"}``) is merged over
    ``prior.metadata``; the reserved keys ``sundae.model_type/format_version/config`` cannot be
    set. DDP / compiled wrappers are unwrapped."""
    model = unwrap(prior)
    if not isinstance(model, SundaePrior):
        raise ValueError(f"save_prior expects a SundaePrior, got {type(model).__name__}")
    extra = {k: v for k, v in getattr(model, "metadata", {}).items() if k not in _RESERVED_META}
    for key, value in (metadata or {}).items():
        if key in _RESERVED_META:
            raise ValueError(f"save_prior: metadata key {key!r} is reserved (set from the model); "
                             f"choose another key, e.g. 'sundae.codec'")
        extra[str(key)] = str(value)
    save_native(model.state_dict(), path, model_type=MODEL_TYPE,
                config_json=config_to_json(model.config), extra_metadata=extra)


def load_prior(source: str | os.PathLike) -> SundaePrior:
    """Load a native prior file, a shipped prior by name (``"mnist-vq"``, ``"mnist-pixels"``,
    ``"emoji"``), or ``hf://owner/repo/path/file.safetensors`` through the
    Hugging Face cache (``HF_HUB_OFFLINE=1`` works for cached files). Strict: missing or
    unexpected weights raise ``ValueError`` naming them. Returns the model in eval mode, fp32,
    on the CPU, with the file's header in ``prior.metadata``.

    The config and the tensor shapes are checked from the file's header (the model built on the
    meta device) before any weight is read or allocated: a config that disagrees with its
    tensors, or one beyond the limits (``MAX_GRID_SIDE``, ``MAX_BLOCKS``, ``MAX_LEVELS``,
    ``_helpers.MAX_PARAMETERS``), is refused at no memory cost."""
    source = resolve_shipped(source, "sundae")
    if is_hf_source(source):
        repo_id, filename = parse_hf_source(str(source))
        if not filename:
            raise ValueError(f"{source!r}: name the prior file inside the repository, e.g. "
                             f"hf://{repo_id}/prior.safetensors")
        path = hf_download(repo_id, filename, source=str(source))
    else:
        path = resolve_local(source, what="load_prior")
    prior, meta = load_native_model(path, expected_type=MODEL_TYPE, config_cls=PriorConfig, build=SundaePrior,
                                    what=f"load_prior({str(path)!r})")
    prior.metadata = dict(meta)
    logger.info("loaded SUNDAE prior %s (%.1fM parameters)", path, prior.num_parameters() / 1e6)
    return prior.float().eval()


__all__ = ["PriorConfig", "SundaePrior", "Hourglass", "save_prior", "load_prior", "MODEL_TYPE"]
