"""The codebook side of the VQ-GAN objective: nearest-code quantization with its
straight-through estimator and VQ loss, codebook health (usage, perplexity) and the collapse
remedies (EMA codebook, dead-code restart). ``vq_losses.py`` combines them with the pixel,
perceptual and GAN terms into ``VQGANLoss`` (and re-exports everything here).

Everything takes tensors — latents ``z_e``, the codebook weight, tokens — so nothing here depends
on VQ-GAN internals beyond the quantizer's own distance function (``vqgan_modules.nearest_code``).

β placement. The VQ-VAE paper's objective is
``‖sg[z_e] − z_q‖² + β·‖z_e − sg[z_q]‖²``: the codebook term (moves codes, weight 1) plus β
times the commitment term (moves the encoder). taming's ``VectorQuantizer2(legacy=True)`` — its
default, which ``VQModel`` never overrides — puts β on the *codebook* term instead
(``mean((sg[z_q] − z)²) + β·mean((z_q − sg[z])²)``), so with β = 0.25 the encoder is pulled 4×
harder than the codes move. We implement the paper's form only (no ``legacy`` switch).

Axis legend: b batch, d code dimension (embed_dim), h w latent grid, n flattened vectors
(b·h·w), k codebook entries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import check_number
from .vqgan_modules import nearest_code

__all__ = [
    "CodebookEMA",
    "DeadCodeRestart",
    "VQLossOutput",
    "code_histogram",
    "codebook_commitment_loss",
    "codebook_usage",
    "lookup_codes",
    "nearest_codes",
    "perplexity",
    "straight_through",
    "vq_losses",
]


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------------
# quantization, codebook and commitment losses
# --------------------------------------------------------------------------------------------


def _check_latent(z_e: torch.Tensor, codebook: torch.Tensor, what: str) -> None:
    if codebook.ndim != 2:
        raise ValueError(f"{what}: codebook must be [k, d], got {tuple(codebook.shape)}")
    if z_e.ndim != 4 or z_e.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{what}: latents must be [b, d, h, w] with d = {codebook.shape[1]} (the codebook's "
            f"embed_dim), got {tuple(z_e.shape)} — pass the output of quant_conv, channels first"
        )


def nearest_codes(z_e: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for every latent vector (taming's quantizer maths).

    Distances ``‖z‖² + ‖e‖² − 2 z·e`` in fp32; ``argmin`` takes the first index on ties. Uses
    ``vqgan_modules.nearest_code``, so tokens match ``VQGAN.quantize`` exactly.

    Args:
        z_e: ``[b, d, h, w]`` encoder latents (after ``quant_conv``).
        codebook: ``[k, d]`` codebook weight.
    Returns:
        tokens ``[b, h, w]`` int64.
    """
    _check_latent(z_e, codebook, "nearest_codes")
    b, _, h, w = z_e.shape
    rows = rearrange(z_e.detach(), "b d h w -> (b h w) d")
    tokens = nearest_code(rows, codebook.detach())  # the VQGAN quantizer's own function
    return rearrange(tokens, "(b h w) -> b h w", b=b, h=h, w=w)


def lookup_codes(tokens: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``tokens [b, h, w]`` -> code vectors ``[b, d, h, w]`` (differentiable w.r.t. the codebook)."""
    return rearrange(F.embedding(tokens, codebook), "b h w d -> b d h w")


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``z_q``, the gradient of ``z_e``
    (``z_e + sg[z_q − z_e]``): decoder gradients pass to the encoder unchanged, none reach the
    codebook through this path."""
    return z_e + (z_q - z_e).detach()


def codebook_commitment_loss(
    z_e: torch.Tensor, z_q: torch.Tensor, *, beta: float, codebook_term: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VQ-VAE codebook + commitment loss with β on the commitment term (see module docstring).

    Args:
        z_e: ``[b, d, h, w]`` encoder latents (gradient: commitment term only).
        z_q: ``[b, d, h, w]`` looked-up codes, *not* straight-through (gradient: codebook term).
        beta: commitment weight (0.25 in the paper).
        codebook_term: drop the codebook term (its gradient) when an EMA updates the codebook.
    Returns:
        ``(loss, codebook, commitment)`` fp32 scalars, ``loss = codebook + β·commitment``
        (``codebook`` is still reported, detached, when ``codebook_term`` is False).
    """
    z_e32, z_q32 = z_e.float(), z_q.float()
    codebook = F.mse_loss(z_q32, z_e32.detach())
    commitment = F.mse_loss(z_e32, z_q32.detach())
    if not codebook_term:
        codebook = codebook.detach()
        return beta * commitment, codebook, commitment
    return codebook + beta * commitment, codebook, commitment


class VQLossOutput(NamedTuple):
    """``vq_losses`` result; unpacks as ``z_q, loss, tokens``."""

    z_q: torch.Tensor  # [b, d, h, w] straight-through codes (value z_q, gradient to z_e)
    loss: torch.Tensor  # scalar codebook + β·commitment
    tokens: torch.Tensor  # [b, h, w] int64


def vq_losses(
    z_e: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, *, codebook_term: bool = True
) -> VQLossOutput:
    """Quantize ``z_e [b, d, h, w]`` against ``codebook [k, d]`` and build the VQ loss.

    Returns ``(z_q_st [b, d, h, w], loss (scalar), tokens [b, h, w])``: ``z_q_st`` is the
    straight-through code tensor to feed the decoder; ``loss`` = codebook + β·commitment (only
    β·commitment with ``codebook_term=False``, for an EMA codebook)."""
    check_number(beta, "vq_losses: beta", low=0, hint="0.25 is usual")
    tokens = nearest_codes(z_e, codebook)
    z_q = lookup_codes(tokens, codebook)
    loss, _, _ = codebook_commitment_loss(z_e, z_q, beta=beta, codebook_term=codebook_term)
    return VQLossOutput(straight_through(z_e, z_q.to(z_e.dtype)), loss, tokens)


# --------------------------------------------------------------------------------------------
# codebook health metrics
# --------------------------------------------------------------------------------------------


def code_histogram(tokens: torch.Tensor, n_embed: int) -> torch.Tensor:
    """Assignment counts per code: ``tokens`` (any shape, int) -> ``[n_embed]`` float32."""
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"code_histogram: tokens must be integers, got {tokens.dtype}")
    flat = tokens.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_embed):
        raise ValueError(
            f"code_histogram: token ids range {int(flat.min())}..{int(flat.max())} but the "
            f"codebook has {n_embed} codes (0..{n_embed - 1}); pass the right n_embed"
        )
    return torch.bincount(flat, minlength=n_embed).float()


def codebook_usage(tokens: torch.Tensor, n_embed: int) -> torch.Tensor:
    """Fraction of the ``n_embed`` codes that occur at least once in ``tokens`` (0-dim float)."""
    return (code_histogram(tokens, n_embed) > 0).float().mean()


def perplexity(tokens: torch.Tensor, n_embed: int) -> torch.Tensor:
    """``exp(entropy)`` of the code histogram of ``tokens`` (0-dim float): ``n`` when ``n``
    codes are used equally often, 1 when a single code is used."""
    counts = code_histogram(tokens, n_embed)
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


# --------------------------------------------------------------------------------------------
# codebook-collapse remedies
# --------------------------------------------------------------------------------------------


def _flat_batch(z_e: torch.Tensor, tokens: torch.Tensor, codebook: torch.Tensor, what: str):
    _check_latent(z_e, codebook, what)
    if tokens.shape != (z_e.shape[0], *z_e.shape[2:]):
        raise ValueError(
            f"{what}: tokens {tuple(tokens.shape)} do not match latents {tuple(z_e.shape)} "
            "(expected [b, h, w])"
        )
    flat = rearrange(z_e.detach(), "b d h w -> (b h w) d").float()
    return flat, tokens.reshape(-1)


class CodebookEMA(nn.Module):
    """Exponential-moving-average codebook (VQ-VAE appendix; online k-means).

    Buffers: ``cluster_size [k]`` (EMA of assignment counts), ``embed_avg [k, d]`` (EMA of summed
    assigned vectors), ``initialized``. On the first update they are set from the current codebook
    with unit cluster sizes, so ``embed_avg / cluster_size`` reproduces it (zero-initialised
    cluster sizes would divide by ~eps and blow unused codes up). Each :meth:`update`::

        cluster_size ← decay·cluster_size + (1 − decay)·counts
        embed_avg    ← decay·embed_avg    + (1 − decay)·Σ assigned z_e
        n = Σ cluster_size;  smoothed = (cluster_size + eps) / (n + k·eps) · n    (Laplace)
        codebook     ← embed_avg / smoothed

    Counts and sums are all-reduced when a process group is running, so replicas stay identical.
    The codebook then takes no gradient: build the VQ loss with ``codebook_term=False``.
    """

    def __init__(self, n_embed: int, embed_dim: int, *, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"CodebookEMA: decay must be in [0, 1), got {decay!r} (0.99 is usual)")
        if not eps > 0:
            raise ValueError(f"CodebookEMA: eps must be > 0, got {eps!r} (1e-5 is usual)")
        self.n_embed, self.embed_dim, self.decay, self.eps = n_embed, embed_dim, decay, eps
        self.register_buffer("cluster_size", torch.ones(n_embed))
        self.register_buffer("embed_avg", torch.zeros(n_embed, embed_dim))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def update(self, codebook: torch.Tensor, z_e: torch.Tensor, tokens: torch.Tensor) -> None:
        """Move ``codebook [k, d]`` (updated in place) toward the mean of the ``z_e
        [b, d, h, w]`` vectors assigned to each code by ``tokens [b, h, w]``. No-op in eval mode."""
        if not self.training:
            return
        if tuple(codebook.shape) != (self.n_embed, self.embed_dim):
            raise ValueError(
                f"CodebookEMA: codebook {tuple(codebook.shape)} does not match the EMA's "
                f"({self.n_embed}, {self.embed_dim}); build CodebookEMA(n_embed, embed_dim) to match"
            )
        flat, idx = _flat_batch(z_e, tokens, codebook, "CodebookEMA.update")
        if not bool(self.initialized):
            self.embed_avg.copy_(codebook.detach().float())
            self.cluster_size.fill_(1.0)
            self.initialized.fill_(True)
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        sums = torch.zeros_like(self.embed_avg).index_add_(0, idx, flat)
        if _dist_active():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        self._write(codebook)

    @torch.no_grad()
    def reset_codes(self, codebook: torch.Tensor, indices: torch.Tensor, vectors: torch.Tensor) -> None:
        """Restart codes ``indices`` at ``vectors [m, d]`` with a unit cluster size, keeping the
        EMA statistics consistent with the codebook (used by :class:`DeadCodeRestart`)."""
        if not bool(self.initialized):
            self.embed_avg.copy_(codebook.detach().float())
            self.cluster_size.fill_(1.0)
            self.initialized.fill_(True)
        self.embed_avg[indices] = vectors.float()
        self.cluster_size[indices] = 1.0
        self._write(codebook)

    def _write(self, codebook: torch.Tensor) -> None:
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
        codebook.copy_((self.embed_avg / rearrange(smoothed, "k -> k 1")).to(codebook.dtype))


class DeadCodeRestart(nn.Module):
    """Re-initialise codes that fell out of use from random encoder outputs of the current batch.

    Buffer ``usage [k]``: EMA (``decay``) of each code's share of the batch assignments relative to
    a uniform share (1.0 = used exactly ``n / k`` times per batch). It starts at 1.0, so a code
    that is never chosen falls below ``threshold`` after ``log(threshold) / log(decay)`` updates
    (≈ 458 for 0.01 / 0.99) — that is the grace period. Dead codes are overwritten with distinct
    randomly chosen ``z_e`` vectors of the batch (with replacement only when the batch has fewer
    vectors than dead codes) and their usage reset to 1.0. Under a process group the counts are
    all-reduced and the new vectors broadcast from rank 0, so replicas stay identical.
    """

    def __init__(self, n_embed: int, *, decay: float = 0.99, threshold: float = 0.01):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"DeadCodeRestart: decay must be in [0, 1), got {decay!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(
                f"DeadCodeRestart: threshold must be in (0, 1) (a fraction of the uniform share), "
                f"got {threshold!r}; 0.01 is usual"
            )
        self.n_embed, self.decay, self.threshold = n_embed, decay, threshold
        self.register_buffer("usage", torch.ones(n_embed))

    @torch.no_grad()
    def update(
        self,
        codebook: torch.Tensor,
        z_e: torch.Tensor,
        tokens: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        ema: CodebookEMA | None = None,
    ) -> torch.Tensor:
        """Update usage from ``tokens [b, h, w]`` and restart dead rows of ``codebook [k, d]``
        (in place) from ``z_e [b, d, h, w]``. Returns the restarted indices (int64, possibly
        empty). ``generator`` (on any device) makes the choice reproducible; ``ema`` keeps an
        EMA codebook's statistics in step. No-op in eval mode."""
        empty = torch.zeros(0, dtype=torch.long, device=codebook.device)
        if not self.training:
            return empty
        if codebook.shape[0] != self.n_embed:
            raise ValueError(
                f"DeadCodeRestart: codebook has {codebook.shape[0]} codes, this restarter "
                f"{self.n_embed}; build DeadCodeRestart(n_embed) to match"
            )
        flat, idx = _flat_batch(z_e, tokens, codebook, "DeadCodeRestart.update")
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        if _dist_active():
            torch.distributed.all_reduce(counts)
        share = counts * (self.n_embed / counts.sum().clamp_min(1.0))
        self.usage.mul_(self.decay).add_(share, alpha=1.0 - self.decay)
        dead = torch.nonzero(self.usage < self.threshold).squeeze(1)
        if dead.numel() == 0:
            return empty
        n, m = flat.shape[0], dead.numel()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if n >= m:
            rows = torch.randperm(n, generator=generator, device=gen_device)[:m]
        else:
            rows = torch.randint(0, n, (m,), generator=generator, device=gen_device)
        vectors = flat[rows.to(flat.device)]
        if _dist_active():
            torch.distributed.broadcast(vectors, src=0)
        codebook[dead] = vectors.to(codebook.dtype)
        self.usage[dead] = 1.0
        if ema is not None:
            ema.reset_codes(codebook, dead, vectors)
        return dead
