"""Codecs between images and token grids: the taming VQ-GAN and the pixel "codec".

``VQGAN(config)`` is the taming-transformers / latent-diffusion VQ autoencoder with the exact
taming state-dict layout (config and presets in ``vqgan_config.py``, blocks in
``vqgan_modules.py``). ``PixelCodec`` gives pixel-level
priors (the paper's MNIST experiment) the same interface. Both map

    images ``[b, c, H, W]`` float in [-1, 1]  <->  tokens ``[b, h, w]`` int64

with ``.downsample_factor``, ``.codebook_size``, ``.config``, ``.in_channels`` and helpers
``padded_size``, ``token_grid`` and ``image_size`` for the size arithmetic.

Policies (decided here, relied upon by nodes and trainer):
- Image sizes that are not multiples of the downsample factor f are **padded** on the right and
  bottom (edge replication by default) up to the next multiple before encoding; the token grid
  then covers the padded image, ``decode`` returns the padded size and cropping back to
  ``(H, W)`` is the caller's job. ``padded_size(H, W)`` tells the size; ``pad="error"`` refuses.
- ``pixel_range == "0,1"`` models (aMUSEd) still take and return [-1, 1] at this API; the
  conversion happens inside.
- ``encode`` / ``decode`` run without autograd (token-level inference API). Training uses
  ``forward`` / ``encode_to_latent`` / ``quantize`` / ``decode_codes``, which keep gradients.

einops axis legend: b batch, c channels, h/w token grid, H/W pixels (y/x within tiles).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._helpers import (
    config_to_json,
    load_native_model,
    save_native,
    unwrap,
)
from .checks import check_int, is_int
from .config_dict import config_property
from .pixel_codec import (
    PixelCodec,
    PixelCodecConfig,
    check_codec_tokens,
    check_images,
    check_pad_mode,
)
from .vqgan_config import VQGANConfig
from .vqgan_modules import Decoder, Encoder, GumbelQuantizer, VectorQuantizer

__all__ = [
    "VQGAN",
    "VQGANConfig",
    "VQGANOutput",
    "PixelCodec",
    "PixelCodecConfig",
    "save_vqgan",
    "load_vqgan_native",
]

logger = logging.getLogger(__name__)

MODEL_TYPE = "vqgan"


# --------------------------------------------------------------------------------------------
# VQ-GAN
# --------------------------------------------------------------------------------------------


class VQGANOutput(NamedTuple):
    """``VQGAN.forward`` result for training. ``recon [b, out_ch, H, W]`` in [-1, 1] (through the
    straight-through estimator); ``latent [b, d, h, w]`` pre-quantization (``quant_conv``
    output); ``quantized [b, d, h, w]`` codebook vectors (gradient to the codebook only);
    ``tokens [b, h, w]`` int64."""

    recon: torch.Tensor
    latent: torch.Tensor
    quantized: torch.Tensor
    tokens: torch.Tensor


class VQGAN(nn.Module):
    """taming VQ-GAN (``taming.models.vqgan.VQModel`` / ``GumbelVQ`` inference maths).

    Token API (no autograd): ``encode(x [b, c, H, W] in [-1, 1]) -> tokens [b, h, w] int64`` and
    ``decode(tokens, tile=None, overlap=None) -> x [b, out_ch, h*f, w*f]`` in [-1, 1].
    Latent API (autograd): ``encode_to_latent(x) -> z [b, embed_dim, h, w]`` (pre-quant),
    ``quantize(z) -> (z_q, tokens)`` (the ``quantize`` submodule; with remap, tokens are reduced
    ids), ``lookup(tokens) -> z_q``, ``decode_codes(z_q) -> x``, ``forward(x) -> VQGANOutput``.

    Sizes not divisible by f are padded (see module docstring and ``padded_size``).
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        if not isinstance(config, VQGANConfig):
            raise ValueError(
                f"VQGAN needs a VQGANConfig, got {type(config).__name__}; use VQGANConfig.from_dict"
            )
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantizer == "vq":
            self.quantize = VectorQuantizer(
                config.n_embed, config.embed_dim, remap_used=config.remap_used
            )
        else:
            self.quantize = GumbelQuantizer(
                config.n_embed, config.embed_dim, config.z_channels, remap_used=config.remap_used
            )
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)
        # a loaded remap buffer must index this codebook: check after every load_state_dict
        self.register_load_state_dict_post_hook(_check_loaded_remap)

    # ---- sizes -------------------------------------------------------------------------------

    downsample_factor = config_property(
        "downsample_factor", "Pixels per token side, f (int): 2 ** (len(ch_mult) - 1)."
    )
    codebook_size = config_property(
        "codebook_size", "Token vocabulary size (int): n_embed, or remap_used under remap."
    )
    in_channels = config_property("in_channels", "Image channels ``encode`` takes (int).")
    out_channels = config_property("out_ch", "Image channels ``decode`` gives (int).")

    @property
    def last_layer(self) -> torch.Tensor:
        """Decoder's last weight (taming's adaptive GAN-loss weight uses its gradient)."""
        return self.decoder.conv_out.weight

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) rounded up to multiples of f: the pixel size ``encode`` actually covers."""
        f = self.downsample_factor
        return -(-height // f) * f, -(-width // f) * f

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) that ``encode`` gives for an (H, W) image (after padding)."""
        ph, pw = self.padded_size(height, width)
        return ph // self.downsample_factor, pw // self.downsample_factor

    def image_size(self, h: int, w: int) -> tuple[int, int]:
        """Pixel size (H, W) that ``decode`` gives for an (h, w) token grid."""
        return h * self.downsample_factor, w * self.downsample_factor

    # ---- latent API (keeps autograd) ------------------------------------------------------------

    def _param(self) -> torch.Tensor:
        return self.quant_conv.weight

    def _encoder_input(self, x: torch.Tensor, pad: str) -> torch.Tensor:
        """Checked images padded to multiples of f, on the model's device and dtype, in the
        model's pixel range: what the encoder sees (see ``encode_to_latent``)."""
        check_images(x, self.in_channels, "VQGAN.encode")
        check_pad_mode(pad)
        height, width = x.shape[-2:]
        ph, pw = self.padded_size(height, width)
        if (ph, pw) != (height, width):
            if pad == "error":
                raise ValueError(
                    f"VQGAN.encode: image size {height}x{width} is not a multiple of the downsample "
                    f"factor {self.downsample_factor}; resize or crop to e.g. {ph}x{pw}, or pass "
                    "pad='replicate'"
                )
            if pad == "reflect" and (ph - height >= height or pw - width >= width):
                raise ValueError(
                    f"VQGAN.encode: image {height}x{width} is too small to reflect-pad; use pad='replicate'"
                )
            logger.debug("VQGAN.encode: padding %dx%d to %dx%d (%s)", height, width, ph, pw, pad)
        param = self._param()
        x = x.to(device=param.device, dtype=param.dtype)
        if (ph, pw) != (height, width):
            x = F.pad(x, (0, pw - width, 0, ph - height), mode=pad)
        if self.config.pixel_range == "0,1":
            x = (x + 1.0) / 2.0
        return x

    def encode_to_latent(self, x: torch.Tensor, *, pad: str = "replicate") -> torch.Tensor:
        """Images ``[b, in_channels, H, W]`` in [-1, 1] -> pre-quant latents
        ``[b, embed_dim, ceil(H/f), ceil(W/f)]`` (encoder + quant_conv). ``pad``: how to extend
        images whose size is not a multiple of f (right/bottom): ``replicate`` (default),
        ``reflect``, ``constant`` (zeros) or ``error``."""
        return self.quant_conv(self.encoder(self._encoder_input(x, pad)))

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[b, h, w]`` -> code vectors ``z_q [b, embed_dim, h, w]``."""
        tokens = check_codec_tokens(tokens, self.codebook_size, "VQGAN.lookup")
        return self.quantize.lookup(tokens.to(self._param().device)).to(self._param().dtype)

    def decode_codes(self, z_q: torch.Tensor) -> torch.Tensor:
        """Code vectors ``[b, embed_dim, h, w]`` -> images ``[b, out_ch, h*f, w*f]`` in [-1, 1]
        (post_quant_conv + decoder)."""
        if (
            not isinstance(z_q, torch.Tensor)
            or z_q.ndim != 4
            or z_q.shape[1] != self.config.embed_dim
        ):
            shape = tuple(z_q.shape) if isinstance(z_q, torch.Tensor) else type(z_q).__name__
            raise ValueError(
                f"VQGAN.decode_codes: expected codes [b, {self.config.embed_dim}, h, w], got {shape}"
            )
        x = self.decoder(self.post_quant_conv(z_q))
        if self.config.pixel_range == "0,1":
            x = x * 2.0 - 1.0
        return x

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        """Training pass: encode, quantize, straight-through, decode (see ``VQGANOutput``)."""
        latent = self.encode_to_latent(x)
        quantized, tokens = self.quantize(latent)
        straight_through = latent + (quantized - latent).detach()
        return VQGANOutput(self.decode_codes(straight_through), latent, quantized, tokens)

    # ---- token API ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(
        self,
        x: torch.Tensor,
        *,
        pad: str = "replicate",
        tile: int | None = None,
        overlap: int | None = None,
    ) -> torch.Tensor:
        """Images ``[b, in_channels, H, W]`` float in [-1, 1] -> tokens ``[b, h, w]`` int64 with
        ``(h, w) = token_grid(H, W)``. Non-multiple sizes are padded right/bottom (``pad``, see
        ``encode_to_latent``); the grid covers the padded image. Gumbel models take the argmax
        code (taming samples).

        ``tile`` (tokens): encode overlapping windows of ``tile x tile`` tokens
        (``tile * f`` pixels) one at a time, neighbours overlapping by ``overlap`` tokens (default
        ``tile // 4``), and keep each token from the window whose centre it is nearest (the
        seam falls in the middle of the overlap). This bounds peak memory by the tile size. The
        result equals the untiled encode exactly when the encoder is local (convolutions only)
        and its receptive field reaches less than ``overlap // 2`` tokens; the taming encoder
        normalises with GroupNorm (statistics per window) and may have attention, so there
        tiled tokens are close to, not equal to, the untiled ones. ``tile >= h`` and ``>= w``
        is exactly the untiled encode."""
        if tile is None:
            _, tokens = self.quantize(self.encode_to_latent(x, pad=pad))
            return tokens
        overlap = _check_tile(tile, overlap, "VQGAN.encode")
        x = self._encoder_input(x, pad)
        f = self.downsample_factor
        b, (h, w) = x.shape[0], (x.shape[-2] // f, x.shape[-1] // f)
        if tile >= h and tile >= w:
            _, tokens = self.quantize(self.quant_conv(self.encoder(x)))
            return tokens
        th, tw = min(tile, h), min(tile, w)
        tokens = torch.empty(b, h, w, dtype=torch.long, device=x.device)
        for (y0, ylo, yhi) in _tile_keep(h, th, overlap):
            for (x0, xlo, xhi) in _tile_keep(w, tw, overlap):
                window = x[..., y0 * f : (y0 + th) * f, x0 * f : (x0 + tw) * f]
                _, piece = self.quantize(self.quant_conv(self.encoder(window)))
                tokens[:, ylo:yhi, xlo:xhi] = piece[:, ylo - y0 : yhi - y0, xlo - x0 : xhi - x0]
        return tokens

    @torch.no_grad()
    def decode(
        self, tokens: torch.Tensor, *, tile: int | None = None, overlap: int | None = None
    ) -> torch.Tensor:
        """Tokens ``[b, h, w]`` int -> images ``[b, out_ch, h*f, w*f]`` in [-1, 1].

        ``tile`` (tokens): decode overlapping ``tile x tile`` windows one at a time and blend them
        with linear ramps across the ``overlap`` tokens (default ``tile // 4``) at each seam. This
        bounds peak memory by the tile size; the result is close to, not equal to, a full decode
        (each tile's receptive field and GroupNorm statistics stop at its border). ``tile >= h``
        and ``>= w`` is exactly the full decode."""
        tokens = check_codec_tokens(tokens, self.codebook_size, "VQGAN.decode")
        if tile is None:
            return self.decode_codes(self.lookup(tokens))
        overlap = _check_tile(tile, overlap, "VQGAN.decode")
        h, w = tokens.shape[-2:]
        if tile >= h and tile >= w:
            return self.decode_codes(self.lookup(tokens))
        return self._decode_tiled(tokens, tile, overlap)

    def _decode_tiled(self, tokens: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        b, h, w = tokens.shape
        f = self.downsample_factor
        device = self._param().device
        out = torch.zeros(b, self.out_channels, h * f, w * f, dtype=torch.float32, device=device)
        total = torch.zeros(1, 1, h * f, w * f, dtype=torch.float32, device=device)
        th, tw = min(tile, h), min(tile, w)
        for y0 in _tile_starts(h, th, overlap):
            wy = _seam_ramp(th * f, overlap * f, start=y0 > 0, end=y0 + th < h, device=device)
            for x0 in _tile_starts(w, tw, overlap):
                wx = _seam_ramp(tw * f, overlap * f, start=x0 > 0, end=x0 + tw < w, device=device)
                piece = self.decode_codes(
                    self.lookup(tokens[:, y0 : y0 + th, x0 : x0 + tw])
                ).float()
                weight = rearrange(wy, "y -> 1 1 y 1") * rearrange(wx, "x -> 1 1 1 x")
                window = (
                    slice(None),
                    slice(None),
                    slice(y0 * f, (y0 + th) * f),
                    slice(x0 * f, (x0 + tw) * f),
                )
                out[window] += piece * weight
                total[window] += weight
        return (out / total).to(self._param().dtype)


def _check_loaded_remap(module: VQGAN, _incompatible_keys: Any) -> None:
    """load_state_dict post-hook (module-level so models stay picklable / deep-copyable)."""
    module.quantize.check_used()


def _check_tile(tile: Any, overlap: Any, who: str) -> int:
    """Validate ``tile`` (tokens) and ``overlap``; returns the overlap (default ``tile // 4``)."""
    check_int(tile, f"{who}: tile", minimum=1, hint="a number of tokens, or None for no tiling")
    if overlap is None:
        overlap = tile // 4
    if not is_int(overlap) or not 0 <= overlap < tile:
        raise ValueError(f"{who}: overlap must be an integer in [0, tile={tile}), got {overlap!r}")
    return overlap


def _tile_keep(n: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """``(start, keep_from, keep_to)`` per window of ``_tile_starts``: the kept ranges partition
    ``range(n)`` and each seam sits in the middle of its two windows' overlap."""
    starts = _tile_starts(n, tile, overlap)
    cuts = [0] + [(nxt + cur + tile) // 2 for cur, nxt in zip(starts[:-1], starts[1:], strict=True)] + [n]
    return [(s, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest windows of ``tile`` that cover ``range(n)`` with neighbours
    overlapping by at least ``overlap``, spread evenly (first at 0, last ending at ``n``)."""
    if tile >= n:
        return [0]
    count = -(-(n - overlap) // (tile - overlap))  # ceil
    span = n - tile
    return [(i * span + (count - 1) // 2) // (count - 1) for i in range(count)]


def _seam_ramp(
    size: int, ramp: int, *, start: bool, end: bool, device: torch.device
) -> torch.Tensor:
    """Blend weights ``[size]``: 1 inside, rising linearly over ``ramp`` pixels at a seam on the
    start side and falling at the end side. Two ramps facing each other over the same overlap sum
    to 1; every weight is > 0, so the normalised blend is defined everywhere."""
    weight = torch.ones(size, dtype=torch.float32, device=device)
    if ramp > 0:
        rise = (torch.arange(ramp, dtype=torch.float32, device=device) + 0.5) / ramp
        if start:
            weight[:ramp] = torch.minimum(weight[:ramp], rise)
        if end:
            weight[-ramp:] = torch.minimum(weight[-ramp:], rise.flip(0))
    return weight


# --------------------------------------------------------------------------------------------
# native files
# --------------------------------------------------------------------------------------------


def save_vqgan(
    model: VQGAN, path: str | os.PathLike, *, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model`` as a native ``.safetensors`` (taming key layout, config JSON in the
    metadata, ``sundae.model_type = vqgan``), atomically. DDP / compiled wrappers are unwrapped."""
    model = unwrap(model)
    if isinstance(model, PixelCodec):
        raise ValueError(
            f"a PixelCodec has no weights to save; identify it by its spec {model.spec!r} instead "
            "(PixelCodec.from_spec rebuilds it)"
        )
    if not isinstance(model, VQGAN):
        raise ValueError(f"save_vqgan expects a VQGAN, got {type(model).__name__}")
    meta = {
        "sundae.codebook_size": str(model.codebook_size),
        "sundae.downsample_factor": str(model.downsample_factor),
    }
    meta.update(extra_metadata or {})
    return save_native(
        model.state_dict(),
        path,
        model_type=MODEL_TYPE,
        config_json=config_to_json(model.config),
        extra_metadata=meta,
    )


def load_vqgan_native(path: str | os.PathLike) -> VQGAN:
    """Read a native VQ-GAN file (``save_vqgan``) strictly: missing / unexpected keys and shape
    mismatches raise ``ValueError`` naming them. Returns the model in eval mode on the CPU.

    Config and tensor shapes are compared from the header (model built on the meta device)
    before any weight is read or allocated."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VQ-GAN file {str(path)!r} does not exist")
    model, _ = load_native_model(path, expected_type=MODEL_TYPE, config_cls=VQGANConfig, build=VQGAN,
                                 what=f"VQ-GAN {str(path)!r}")
    return model.eval()
