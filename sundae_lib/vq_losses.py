"""VQ-GAN training objective: reconstruction, perceptual, GAN and codebook losses, plus codebook
health (usage, perplexity) and collapse remedies (EMA codebook, dead-code restart).

Everything takes tensors — latents ``z_e``, the codebook weight, logits, images — so nothing here
depends on VQ-GAN internals. One generator training step, in the trainer::

    z_e = vqgan.encode_to_latent(x)                              # [b, d, h, w]
    codebook = vqgan.quantize.embedding.weight                   # [k, d]
    z_q, codebook_loss, tokens = loss.quantize(z_e, codebook)    # straight-through z_q
    recon = vqgan.decode_codes(z_q)
    g_loss, log = loss.generator_step(x, recon, codebook_loss, step,
                                      last_layer=vqgan.decoder.conv_out.weight)
    g_loss.backward(); opt_g.step()
    d_loss, dlog = loss.discriminator_step(x, recon, step)
    d_loss.backward(); opt_d.step()
    log |= loss.codebook_step(codebook, z_e.detach(), tokens)    # EMA / restart, after backward

(``out = vqgan(x)`` works too: ``loss.vq_loss(out.latent, out.quantized)`` is the same VQ loss and
``out.recon`` the straight-through reconstruction.) The GAN functions (``hinge_d_loss``,
``vanilla_d_loss``, ``calculate_adaptive_weight``, ``adopt_weight``, …) live in
``discriminator.py`` and are re-exported here.

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

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._helpers import load_state_dict_strict
from .config_dict import config_from_dict
from .discriminator import (
    adopt_weight,
    build_discriminator,
    calculate_adaptive_weight,
    frozen,
    generator_adversarial_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from .vqgan_modules import nearest_code

__all__ = [
    "CODEBOOK_REMEDIES",
    "CodebookEMA",
    "DeadCodeRestart",
    "VQGANLoss",
    "VQLossConfig",
    "VQLossOutput",
    "adopt_weight",
    "calculate_adaptive_weight",
    "code_histogram",
    "frozen",
    "lookup_codes",
    "codebook_commitment_loss",
    "codebook_usage",
    "generator_adversarial_loss",
    "hinge_d_loss",
    "nearest_codes",
    "perplexity",
    "reconstruction_loss",
    "straight_through",
    "vanilla_d_loss",
    "vq_losses",
]


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------


def reconstruction_loss(inputs: torch.Tensor, recons: torch.Tensor, *, kind: str = "l1") -> torch.Tensor:
    """Mean pixel loss between ``inputs`` and ``recons`` ``[b, c, H, W]``: ``"l1"`` (taming's) or
    ``"l2"`` (mean squared error). Returns a scalar (fp32)."""
    if inputs.shape != recons.shape:
        raise ValueError(
            f"reconstruction_loss: inputs {tuple(inputs.shape)} and reconstructions "
            f"{tuple(recons.shape)} differ in shape; the decoder must return the input size"
        )
    diff = inputs.float() - recons.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "l2":
        return (diff * diff).mean()
    raise ValueError(f"reconstruction_loss: kind must be 'l1' or 'l2', got {kind!r}")


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
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta >= 0):
        raise ValueError(f"vq_losses: beta must be a number >= 0, got {beta!r} (0.25 is usual)")
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


def _finite_number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# --------------------------------------------------------------------------------------------
# the combined objective (taming's VQLPIPSWithDiscriminator, discriminator owned apart)
# --------------------------------------------------------------------------------------------

CODEBOOK_REMEDIES = ("none", "restart", "ema", "ema+restart")
_DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


@dataclasses.dataclass
class VQLossConfig:
    """Settings of :class:`VQGANLoss` (taming's ``lossconfig`` names where they exist).

    ``disc_weight`` scales the adaptive GAN weight; ``disc_factor`` is the GAN factor that
    ``adopt_weight`` zeroes before ``disc_start`` steps (the discriminator is then not run in the
    generator step). ``beta`` weights the *commitment* term (paper placement). ``pixel_weight``
    scales the pixel loss (taming stores but never applies it; 1.0 matches taming).
    ``codebook_remedy``: ``"none"``; ``"restart"`` (dead codes re-initialised from batch
    encodings); ``"ema"`` (EMA codebook, no codebook gradient term); ``"ema+restart"``.
    """

    codebook_weight: float = 1.0
    beta: float = 0.25
    pixel_weight: float = 1.0
    pixel_loss: str = "l1"
    perceptual_weight: float = 1.0
    disc_weight: float = 1.0
    disc_start: int = 10_000
    disc_factor: float = 1.0
    disc_loss: str = "hinge"
    disc_num_layers: int = 3
    disc_ndf: int = 64
    disc_in_channels: int = 3
    disc_actnorm: bool = False
    adaptive_weight: bool = True
    codebook_remedy: str = "none"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart_decay: float = 0.99
    restart_threshold: float = 0.01

    def __post_init__(self):
        for name in ("codebook_weight", "beta", "pixel_weight", "perceptual_weight", "disc_weight",
                     "disc_factor"):
            value = getattr(self, name)
            _finite_number(value, f"VQLossConfig.{name}")
            if value < 0:
                raise ValueError(f"VQLossConfig.{name} must be >= 0, got {value!r}")
        for name, low in (("disc_start", 0), ("disc_num_layers", 1), ("disc_ndf", 1),
                          ("disc_in_channels", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"VQLossConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("disc_actnorm", "adaptive_weight"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VQLossConfig.{name} must be true or false, got {getattr(self, name)!r}")
        choices = (("pixel_loss", ("l1", "l2")), ("disc_loss", tuple(_DISC_LOSSES)),
                   ("codebook_remedy", CODEBOOK_REMEDIES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"VQLossConfig.{name} = {getattr(self, name)!r} is not supported; use one of {list(allowed)}"
                )
        for name in ("ema_decay", "restart_decay"):
            value = getattr(self, name)
            _finite_number(value, f"VQLossConfig.{name}")
            if not 0.0 <= value < 1.0:
                raise ValueError(f"VQLossConfig.{name} must be in [0, 1), got {value!r} (0.99 is usual)")
        _finite_number(self.ema_eps, "VQLossConfig.ema_eps")
        if self.ema_eps <= 0:
            raise ValueError(f"VQLossConfig.ema_eps must be > 0, got {self.ema_eps!r} (1e-5 is usual)")
        _finite_number(self.restart_threshold, "VQLossConfig.restart_threshold")
        if not 0.0 < self.restart_threshold < 1.0:
            raise ValueError(
                f"VQLossConfig.restart_threshold must be in (0, 1) (a fraction of the uniform code "
                f"share), got {self.restart_threshold!r}; 0.01 is usual"
            )

    @classmethod
    def from_dict(cls, data: Mapping) -> VQLossConfig:
        """Strict construction: unknown keys are an error listing the valid ones."""
        return config_from_dict(cls, data, what="VQLossConfig")


class VQGANLoss(nn.Module):
    """VQ-GAN objective (taming's ``VQLPIPSWithDiscriminator``) with the discriminator, LPIPS and
    codebook-remedy state held here, never inside the VQ-GAN.

    ``generator_step`` is taming's ``optimizer_idx == 0`` branch, ``discriminator_step`` the
    ``optimizer_idx == 1`` branch; ``quantize`` and ``codebook_step`` wrap :func:`vq_losses` and
    the configured remedy. Optimise ``self.discriminator.parameters()`` with its own optimizer.
    Under DDP, wrap the discriminator separately, pass the wrapper to ``discriminator_step`` and
    the bare module (or nothing) to ``generator_step``, which runs it with frozen parameters.

    Args:
        config: :class:`VQLossConfig`.
        perceptual: LPIPS module (``make_perceptual_loss``) or ``None`` to train without it.
        discriminator: a prebuilt discriminator; default ``build_discriminator`` from config.
        n_embed, embed_dim: codebook shape, required by the ``ema`` / ``restart`` remedies.
    """

    def __init__(
        self,
        config: VQLossConfig | None = None,
        *,
        perceptual: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        n_embed: int | None = None,
        embed_dim: int | None = None,
    ):
        super().__init__()
        config = VQLossConfig() if config is None else config
        if not isinstance(config, VQLossConfig):
            raise ValueError(
                f"VQGANLoss: config must be a VQLossConfig, got {type(config).__name__}; build one "
                "with VQLossConfig.from_dict(...)"
            )
        self.config = config
        self.perceptual = perceptual
        if discriminator is None:
            discriminator = build_discriminator(
                config.disc_in_channels, config.disc_ndf, config.disc_num_layers, config.disc_actnorm
            )
        self.discriminator = discriminator
        self.disc_loss_fn = _DISC_LOSSES[config.disc_loss]
        remedy = config.codebook_remedy
        if remedy != "none" and n_embed is None:
            raise ValueError(
                f"VQGANLoss: codebook_remedy {remedy!r} needs the codebook size; pass "
                "n_embed=vqgan.codebook_size (and embed_dim for 'ema')"
            )
        if "ema" in remedy and embed_dim is None:
            raise ValueError("VQGANLoss: codebook_remedy 'ema' needs embed_dim=vqgan.config.embed_dim")
        self.ema = (
            CodebookEMA(n_embed, embed_dim, decay=config.ema_decay, eps=config.ema_eps)
            if "ema" in remedy
            else None
        )
        self.restart = (
            DeadCodeRestart(n_embed, decay=config.restart_decay, threshold=config.restart_threshold)
            if "restart" in remedy
            else None
        )
        self.n_embed = n_embed

    # -- codebook --------------------------------------------------------------------------

    def quantize(self, z_e: torch.Tensor, codebook: torch.Tensor) -> VQLossOutput:
        """:func:`vq_losses` with this config's β; with an EMA codebook the codebook gradient
        term is dropped. Returns ``(z_q_st [b, d, h, w], codebook_loss, tokens [b, h, w])``."""
        return vq_losses(z_e, codebook, self.config.beta, codebook_term=self.ema is None)

    def vq_loss(self, latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """The same VQ loss from ``VQGAN.forward``'s outputs: ``latent`` (z_e) and ``quantized``
        (plain codebook lookup, not straight-through), both ``[b, d, h, w]``. Scalar."""
        loss, _, _ = codebook_commitment_loss(
            latent, quantized, beta=self.config.beta, codebook_term=self.ema is None
        )
        return loss

    @torch.no_grad()
    def codebook_step(
        self,
        codebook: torch.Tensor,
        z_e: torch.Tensor,
        tokens: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        split: str = "train",
    ) -> dict[str, torch.Tensor]:
        """After backward (and the optimizer step): log codebook usage/perplexity of ``tokens``
        and, in training mode, apply the remedy to ``codebook [k, d]`` in place (EMA update, then
        dead-code restart). ``z_e [b, d, h, w]`` are this batch's latents."""
        k = codebook.shape[0]
        log = {
            f"{split}/codebook_usage": codebook_usage(tokens, k),
            f"{split}/perplexity": perplexity(tokens, k),
        }
        if self.ema is not None:
            self.ema.update(codebook, z_e, tokens)
        if self.restart is not None:
            dead = self.restart.update(codebook, z_e, tokens, generator=generator, ema=self.ema)
            log[f"{split}/codes_restarted"] = torch.tensor(float(dead.numel()))
        return log

    # -- generator / discriminator ---------------------------------------------------------

    def generator_step(
        self,
        inputs: torch.Tensor,
        recons: torch.Tensor,
        codebook_loss: torch.Tensor,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        *,
        discriminator: nn.Module | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator (autoencoder) loss: ``nll + d_weight·disc_factor·g_loss + codebook_weight·
        codebook_loss`` with ``nll = pixel_weight·rec + perceptual_weight·lpips``.

        Args:
            inputs, recons: ``[b, c, H, W]`` images in [-1, 1] (``recons`` carries the graph).
            codebook_loss: scalar from :meth:`quantize`.
            global_step: gates the GAN term (``disc_start``).
            last_layer: the decoder's last weight (``decoder.conv_out.weight``), needed for the
                adaptive weight once the GAN term is on.
            discriminator: override (e.g. the bare module under DDP); runs with frozen params,
                so this loss never writes discriminator gradients.
        Returns:
            ``(loss, log)``; log values are detached tensors keyed ``{split}/...``.
        """
        cfg = self.config
        rec = reconstruction_loss(inputs, recons, kind=cfg.pixel_loss)
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p_loss = self.perceptual(inputs.contiguous(), recons.contiguous()).mean()
        else:
            p_loss = rec.new_zeros(())
        nll = cfg.pixel_weight * rec + cfg.perceptual_weight * p_loss
        disc_factor = adopt_weight(cfg.disc_factor, global_step, threshold=cfg.disc_start)
        g_loss, d_weight = rec.new_zeros(()), rec.new_zeros(())
        if disc_factor > 0 and cfg.disc_weight > 0:
            disc = self.discriminator if discriminator is None else discriminator
            with frozen(disc):
                g_loss = generator_adversarial_loss(disc(recons.contiguous()).float())
            if not cfg.adaptive_weight:
                d_weight = rec.new_tensor(cfg.disc_weight)
            elif torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad:
                if last_layer is None:
                    raise ValueError(
                        "VQGANLoss.generator_step: the adaptive GAN weight needs last_layer= the "
                        "decoder's last weight (vqgan.decoder.conv_out.weight), or set "
                        "adaptive_weight = false"
                    )
                d_weight = calculate_adaptive_weight(nll, g_loss, last_layer, cfg.disc_weight)
            # else: evaluation without a graph — like taming, the GAN term is left out (weight 0)
        q_loss = torch.as_tensor(codebook_loss, dtype=torch.float32, device=rec.device).mean()
        loss = nll + d_weight * disc_factor * g_loss + cfg.codebook_weight * q_loss
        log = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/quant_loss": q_loss.detach(),
            f"{split}/nll_loss": nll.detach(),
            f"{split}/rec_loss": rec.detach(),
            f"{split}/p_loss": p_loss.detach(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": rec.new_tensor(float(disc_factor)),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log

    def discriminator_step(
        self,
        inputs: torch.Tensor,
        recons: torch.Tensor,
        global_step: int,
        *,
        discriminator: nn.Module | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss ``disc_factor · d_loss(D(inputs), D(recons))`` on detached images
        (never any gradient to the generator). Real and fake run as separate batches, as in
        taming (BatchNorm statistics per batch). Returns ``(loss, log)``."""
        disc = self.discriminator if discriminator is None else discriminator
        logits_real = disc(inputs.contiguous().detach()).float()
        logits_fake = disc(recons.contiguous().detach()).float()
        disc_factor = adopt_weight(self.config.disc_factor, global_step, threshold=self.config.disc_start)
        d_loss = disc_factor * self.disc_loss_fn(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log

    # -- resumable state -------------------------------------------------------------------

    def training_state(self) -> dict[str, torch.Tensor]:
        """Discriminator and remedy tensors (``discriminator.*``, ``ema.*``, ``restart.*``) for
        the trainer's state file; the frozen LPIPS weights are left out."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("perceptual.")}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict inverse of :meth:`training_state` (errors name missing / unexpected keys)."""
        parts = {"discriminator": self.discriminator, "ema": self.ema, "restart": self.restart}
        known = tuple(f"{name}." for name, mod in parts.items() if mod is not None)
        stray = sorted(k for k in state if not k.startswith(known))
        if stray:
            raise ValueError(
                f"VQGANLoss.load_training_state: unexpected keys {stray[:8]} — the state was saved "
                f"with another codebook_remedy or discriminator; expected prefixes {list(known)}"
            )
        for name, mod in parts.items():
            if mod is not None:
                sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
                load_state_dict_strict(mod, sub, what=f"VQGANLoss {name} state")
