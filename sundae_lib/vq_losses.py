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
``out.recon`` the straight-through reconstruction.) The codebook pieces (``vq_losses``,
``nearest_codes``, ``codebook_usage``, ``CodebookEMA``, ``DeadCodeRestart``, …; β sits on the
commitment term, as in the VQ-VAE paper) live in ``vq_codebook.py``, the GAN functions
(``hinge_d_loss``, ``vanilla_d_loss``, ``calculate_adaptive_weight``, ``adopt_weight``, …) in
``discriminator.py``; both are re-exported here.

Axis legend: b batch, c channels, H W pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from ._helpers import load_state_dict_strict
from .checks import check_bool, check_int, check_number
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
from .vq_codebook import (
    CodebookEMA,
    DeadCodeRestart,
    VQLossOutput,
    code_histogram,
    codebook_commitment_loss,
    codebook_usage,
    lookup_codes,
    nearest_codes,
    perplexity,
    straight_through,
    vq_losses,
)

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
# the combined objective (taming's VQLPIPSWithDiscriminator, discriminator owned apart)
# --------------------------------------------------------------------------------------------

CODEBOOK_REMEDIES = ("none", "restart", "ema", "ema+restart")
_DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


@dataclasses.dataclass
class VQLossConfig:
    """Settings of :class:`VQGANLoss` (taming's ``lossconfig`` names where they exist).

    Each field carries its own docstring below (shown on hover by IDEs and by Sphinx).
    """

    codebook_weight: float = 1.0
    """Weight of the quantizer's loss (its codebook and commitment terms) in the generator loss."""
    beta: float = 0.25
    """Weight of the *commitment* term (the paper's placement of beta)."""
    pixel_weight: float = 1.0
    """Scale of the pixel loss (taming stores it but never applies it; 1.0 matches taming)."""
    pixel_loss: str = "l1"
    """``"l1"`` or ``"l2"`` reconstruction loss."""
    perceptual_weight: float = 1.0
    """Weight of the LPIPS term (0 skips its forward pass)."""
    disc_weight: float = 1.0
    """Scale of the adaptive GAN weight."""
    disc_start: int = 10_000
    """Step before which ``adopt_weight`` zeroes the GAN term (the discriminator does not run in
    the generator step until then)."""
    disc_factor: float = 1.0
    """The GAN factor that ``adopt_weight`` applies from ``disc_start`` on."""
    disc_loss: str = "hinge"
    """Discriminator objective: ``"hinge"`` or ``"vanilla"``."""
    disc_num_layers: int = 3
    """Strided layers of the PatchGAN discriminator."""
    disc_ndf: int = 64
    """Base channel width of the discriminator."""
    disc_in_channels: int = 3
    """Image channels the discriminator reads."""
    disc_actnorm: bool = False
    """ActNorm instead of BatchNorm in the discriminator (taming's option)."""
    adaptive_weight: bool = True
    """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer;
    ``False`` uses ``disc_weight`` as it is."""
    codebook_remedy: str = "none"
    """Dead-code remedy: ``"none"``; ``"restart"`` (dead codes re-initialised from batch
    encodings); ``"ema"`` (EMA codebook, no codebook gradient term); ``"ema+restart"``."""
    ema_decay: float = 0.99
    """Decay of the EMA codebook, in [0, 1)."""
    ema_eps: float = 1e-5
    """Laplace smoothing of the EMA cluster sizes (> 0)."""
    restart_decay: float = 0.99
    """Decay of the per-code usage average that finds dead codes, in [0, 1)."""
    restart_threshold: float = 0.01
    """A code whose usage falls below this fraction of the uniform share is restarted, in (0, 1)."""

    def __post_init__(self):
        for name in ("codebook_weight", "beta", "pixel_weight", "perceptual_weight", "disc_weight",
                     "disc_factor"):
            check_number(getattr(self, name), f"VQLossConfig.{name}", low=0)
        for name, low in (("disc_start", 0), ("disc_num_layers", 1), ("disc_ndf", 1),
                          ("disc_in_channels", 1)):
            check_int(getattr(self, name), f"VQLossConfig.{name}", minimum=low)
        for name in ("disc_actnorm", "adaptive_weight"):
            check_bool(getattr(self, name), f"VQLossConfig.{name}")
        choices = (("pixel_loss", ("l1", "l2")), ("disc_loss", tuple(_DISC_LOSSES)),
                   ("codebook_remedy", CODEBOOK_REMEDIES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"VQLossConfig.{name} = {getattr(self, name)!r} is not supported; use one of {list(allowed)}"
                )
        for name in ("ema_decay", "restart_decay"):
            check_number(getattr(self, name), f"VQLossConfig.{name}", low=0, high=1,
                         high_open=True, hint="0.99 is usual")
        check_number(self.ema_eps, "VQLossConfig.ema_eps", low=0, low_open=True,
                     hint="1e-5 is usual")
        check_number(self.restart_threshold, "VQLossConfig.restart_threshold", low=0, high=1,
                     low_open=True, high_open=True,
                     hint="a fraction of the uniform code share; 0.01 is usual")

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
