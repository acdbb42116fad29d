"""Building blocks of the taming-transformers VQ-GAN: Encoder, Decoder and the quantizers.

Module and parameter names follow taming exactly (``encoder.down.{i}.block.{j}.conv1``,
``decoder.up.{i}`` indexed by level, ``quantize.embedding.weight``, ...), so taming /
latent-diffusion state dicts load strictly.

Maths follows ``taming/modules/diffusionmodules/model.py``: GroupNorm (eps 1e-6, affine), swish,
ResnetBlock without timestep embedding, single-head AttnBlock with scale C^-1/2, Downsample =
zero-pad right/bottom by one then a 3x3 stride-2 conv (or 2x2 average pooling), Upsample =
nearest x2 then a 3x3 conv, no tanh at the output.

einops axis legend:
    b  batch             c  channels (d for code-vector channels)
    h, w  feature-map height / width (tokens for latents)
    n  flattened positions (b h w) or attention positions (h w)
    k  codebook entries
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .vqgan_config import VQGANConfig

# Rows of the (positions x codes) distance matrix computed at once: bounds the quantizer's
# scratch memory to ~64 MiB of fp32 whatever the image size and codebook size.
_DISTANCE_CHUNK_ELEMENTS = 1 << 24


def normalize(channels: int, groups: int) -> nn.GroupNorm:
    """taming's ``Normalize``: GroupNorm with eps 1e-6 and affine parameters."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """taming's ``nonlinearity``: x * sigmoid(x) (= SiLU)."""
    return F.silu(x, inplace=inplace)


def _inference() -> bool:
    """True when no graph is being recorded: blocks may then overwrite their temporaries in
    place (same values, one activation-sized buffer less at megapixel sizes)."""
    return not torch.is_grad_enabled()


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a 1x1 ``nin_shortcut``
    when the channel count changes. ``x: [b, c_in, h, w] -> [b, c_out, h, w]``."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(
                in_channels, out_channels, kernel_size=1, stride=1, padding=0
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one statement per step so each temporary is freed as soon as the next one exists
        inplace = _inference()
        h = swish(self.norm1(x), inplace=inplace)
        h = self.conv1(h)
        h = swish(self.norm2(h), inplace=inplace)
        h = self.conv2(self.dropout(h))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return h.add_(x) if inplace else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions with 1x1-conv projections, scale C^-1/2
    and a residual connection. ``x: [b, c, h, w] -> [b, c, h, w]``.

    ``scaled_dot_product_attention`` computes softmax(q k^T / sqrt(c)) v exactly like taming's
    explicit bmm/softmax (equal within fp32 rounding; tests compare against the explicit form),
    without materialising the (h w)^2 matrix on backends with fused kernels."""

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(p(h), "b c h w -> b 1 (h w) c") for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale = c ** -0.5, as taming
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve h and w: zero-pad right and bottom by one then a 3x3 stride-2 conv (taming's
    asymmetric padding), or 2x2 average pooling when ``with_conv`` is False."""

    def __init__(self, channels: int, *, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour x2, then a 3x3 conv when ``with_conv``."""

    def __init__(self, channels: int, *, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _mid_block(channels: int, config: VQGANConfig) -> nn.Module:
    """``mid.{block_1, attn_1, block_2}``; ``attn_1`` is an Identity (no keys) without mid
    attention, like latent-diffusion's ``attn_type: none``."""
    groups, dropout = config.norm_groups, config.dropout
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups=groups, dropout=dropout)
    mid.attn_1 = AttnBlock(channels, groups=groups) if config.mid_attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, groups=groups, dropout=dropout)
    return mid


class Encoder(nn.Module):
    """Image ``[b, in_channels, H, W]`` -> latent ``[b, z_channels, H/f, W/f]`` (taming Encoder,
    no timestep embedding). H and W must be multiples of f = 2^(levels-1)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        c, groups, dropout = config, config.norm_groups, config.dropout
        attn_levels = set(config.attn_levels)
        self.num_levels = len(c.ch_mult)
        self.num_res_blocks = c.num_res_blocks
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *c.ch_mult)
        self.down = nn.ModuleList()
        block_in = c.ch
        for level in range(self.num_levels):
            block_in, block_out = c.ch * in_mult[level], c.ch * c.ch_mult[level]
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, groups=groups, dropout=dropout))
                block_in = block_out
                if level in attn_levels:
                    down.attn.append(AttnBlock(block_in, groups=groups))
            if level != self.num_levels - 1:
                down.downsample = Downsample(block_in, with_conv=c.resamp_with_conv)
            self.down.append(down)
        self.mid = _mid_block(block_in, c)
        self.norm_out = normalize(block_in, groups)
        z_out = 2 * c.z_channels if c.double_z else c.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for j, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[j](h)
            if level != self.num_levels - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h), inplace=_inference()))


class Decoder(nn.Module):
    """Latent ``[b, z_channels, h, w]`` -> image ``[b, out_ch, h*f, w*f]`` (taming Decoder, no
    tanh). ``up[i]`` is level i (0 = full resolution, executed last), with R+1 blocks each."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        c, groups, dropout = config, config.norm_groups, config.dropout
        attn_levels = set(config.attn_levels)
        self.num_levels = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, c)
        ups: list[nn.Module] = []
        for level in reversed(range(self.num_levels)):
            block_out = c.ch * c.ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, groups=groups, dropout=dropout))
                block_in = block_out
                if level in attn_levels:
                    up.attn.append(AttnBlock(block_in, groups=groups))
            if level != 0:
                up.upsample = Upsample(block_in, with_conv=c.resamp_with_conv)
            ups.insert(0, up)  # taming prepends: the index is the level, not execution order
        self.up = nn.ModuleList(ups)
        self.norm_out = normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_levels)):
            up = self.up[level]
            for j, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[j](h)
            if level != 0:
                h = up.upsample(h)
        h = swish(self.norm_out(h), inplace=_inference())
        return self.conv_out(h)


# --------------------------------------------------------------------------------------------
# quantizers
# --------------------------------------------------------------------------------------------


class _RemapMixin:
    """taming's ``remap``: a ``used`` buffer of full-codebook indices; token ids index ``used``
    (a reduced vocabulary of ``len(used)``). Without remap ``used`` is absent."""

    n_embed: int
    remap_used: int
    used: torch.Tensor

    def _init_remap(self, remap_used: int) -> None:
        self.remap_used = remap_used
        if remap_used > 0:
            # identity placeholder; a checkpoint's buffer replaces it on load
            self.register_buffer("used", torch.arange(remap_used, dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        return self.remap_used if self.remap_used > 0 else self.n_embed

    def check_used(self) -> None:
        """Fail clearly when a loaded ``used`` buffer cannot index the codebook."""
        if self.remap_used <= 0:
            return
        used = self.used
        if used.dtype.is_floating_point or used.dtype == torch.bool:
            raise ValueError(
                f"quantize.used must hold integer code indices, got dtype {used.dtype}"
            )
        lo, hi = int(used.min()), int(used.max())
        if lo < 0 or hi >= self.n_embed:
            raise ValueError(
                f"quantize.used holds code indices in [{lo}, {hi}] but the codebook has "
                f"{self.n_embed} entries (valid 0..{self.n_embed - 1}): the remap buffer does not "
                "belong to this codebook — load the matching checkpoint"
            )
        if torch.unique(used).numel() != used.numel():
            raise ValueError(
                "quantize.used lists some code index twice; a remap must be a set of distinct codes"
            )

    def full_to_reduced_ids(self, full_ids: torch.Tensor) -> torch.Tensor:
        """Full-codebook ids -> reduced ids (positions in ``used``). Ids not in ``used`` raise."""
        if self.remap_used <= 0:
            return full_ids
        table = torch.full((self.n_embed,), -1, dtype=torch.long, device=full_ids.device)
        table[self.used.to(full_ids.device)] = torch.arange(self.remap_used, device=full_ids.device)
        reduced = table[full_ids]
        if bool((reduced < 0).any()):
            bad = sorted({int(i) for i in full_ids[reduced < 0].flatten()[:8]})
            raise ValueError(
                f"codes {bad} are not in this model's remap vocabulary (quantize.used)"
            )
        return reduced

    def reduced_to_full_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (reduced vocabulary when remapped) -> full-codebook ids: ``used[id]``."""
        if self.remap_used <= 0:
            return tokens
        return self.used.to(tokens.device)[tokens]

    def _check_latent(self, z: torch.Tensor, channels: int) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != channels:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f"quantize: expected pre-quant latents [b, {channels}, h, w], got {shape}"
            )

    def _candidate_codes(self, device: torch.device) -> torch.Tensor | None:
        """Full ids the quantizer may choose: ``used`` with remap (nearest *used* code), else all."""
        return self.used.to(device) if self.remap_used > 0 else None


def nearest_code(z_rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each row of ``z_rows``.

    ``z_rows: [n, d]``, ``codebook: [k, d]`` -> ``[n]`` int64. Distances
    ``|z|^2 + |e|^2 - 2 z.e`` in fp32 (taming ``VectorQuantizer2``), argmin returns the first
    index on ties. Rows are processed in chunks so the [n, k] matrix never exceeds ~64 MiB."""
    z_rows = z_rows.float()
    codebook = codebook.float()
    e_sq = rearrange(codebook.pow(2).sum(dim=1), "k -> 1 k")
    chunk = max(1, _DISTANCE_CHUNK_ELEMENTS // max(1, codebook.shape[0]))
    out = []
    for start in range(0, z_rows.shape[0], chunk):
        z = z_rows[start : start + chunk]
        dist = z.pow(2).sum(dim=1, keepdim=True) + e_sq - 2.0 * (z @ codebook.t())
        out.append(dist.argmin(dim=1))
    if not out:
        return torch.zeros(0, dtype=torch.long, device=z_rows.device)
    return torch.cat(out)


class VectorQuantizer(_RemapMixin, nn.Module):
    """Nearest-neighbour quantizer (taming ``VectorQuantizer2``; keys ``embedding.weight`` and,
    with remap, ``used``).

    ``forward(z: [b, d, h, w]) -> (z_q: [b, d, h, w], tokens: [b, h, w] int64)``. ``z_q`` is the
    plain codebook lookup (differentiable w.r.t. the codebook, not w.r.t. z; the straight-through
    estimator lives in ``VQGAN.forward``). With remap, only ``used`` codes are candidates and
    tokens are reduced ids (taming maps an unused nearest code to a random or extra id instead)."""

    def __init__(self, n_embed: int, embed_dim: int, *, remap_used: int = 0):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # as taming
        self._init_remap(remap_used)

    @property
    def codebook(self) -> torch.Tensor:
        """``[n_embed, embed_dim]`` code vectors (full vocabulary)."""
        return self.embedding.weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_latent(z, self.embed_dim)
        b, _, h, w = z.shape
        rows = rearrange(z, "b d h w -> (b h w) d")
        candidates = self._candidate_codes(z.device)
        with torch.no_grad():
            if candidates is None:
                tokens = nearest_code(rows, self.codebook)
            else:  # indices into `used` are exactly the reduced ids
                tokens = nearest_code(rows, self.codebook[candidates])
        tokens = rearrange(tokens, "(b h w) -> b h w", b=b, h=h, w=w)
        return self.lookup(tokens).to(z.dtype), tokens

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[b, h, w]`` -> code vectors ``[b, d, h, w]``."""
        vectors = self.embedding(self.reduced_to_full_ids(tokens))
        return rearrange(vectors, "b h w d -> b d h w")


class GumbelQuantizer(_RemapMixin, nn.Module):
    """taming ``GumbelQuantize`` (keys ``proj.{weight,bias}``, ``embed.weight``, remap ``used``).

    Deterministic deviation: taming draws a hard Gumbel-softmax sample even in eval mode; here the
    token is the argmax of the ``proj`` logits (first index on ties), i.e. the mode of that
    distribution, so encoding is reproducible. Decode is the same codebook lookup as taming.
    Inference only: there is no relaxed (Gumbel-softmax) path, so ``proj`` gets no gradient and
    training a gumbel model is not supported.
    ``forward(z: [b, d, h, w]) -> (z_q, tokens)`` as ``VectorQuantizer``."""

    def __init__(self, n_embed: int, embed_dim: int, in_channels: int, *, remap_used: int = 0):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_channels, n_embed, kernel_size=1)
        self.embed = nn.Embedding(n_embed, embed_dim)
        self._init_remap(remap_used)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embed.weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_latent(z, self.proj.in_channels)
        with torch.no_grad():
            logits = self.proj(z).float()  # [b, k, h, w]
            candidates = self._candidate_codes(z.device)
            if candidates is not None:
                logits = logits.index_select(1, candidates)
            tokens = logits.argmax(dim=1)
        return self.lookup(tokens).to(z.dtype), tokens

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        vectors = self.embed(self.reduced_to_full_ids(tokens))
        return rearrange(vectors, "b h w d -> b d h w")
