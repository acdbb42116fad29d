"""Pixel-level "codec": the identity codec for pixel priors, plus the input checks that every
codec shares (``check_images``, ``check_codec_tokens``, ``check_pad_mode``).

``PixelCodec`` gives pixel-level priors (the paper's MNIST experiment) the interface of
``VQGAN``: images ``[b, c, H, W]`` float in [-1, 1] <-> tokens ``[b, h, w]`` int64, with
``.downsample_factor`` (1), ``.codebook_size`` (levels), ``.config``, ``.in_channels``.

einops axis legend: b batch, c channels, h/w pixel rows / columns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .checks import check_int, check_tokens
from .config_dict import config_from_dict, config_property

PAD_MODES = ("replicate", "reflect", "constant", "error")

# --------------------------------------------------------------------------------------------
# input checks shared by the codecs
# --------------------------------------------------------------------------------------------


def check_images(x: Any, channels: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: expected an image tensor [b, c, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"{what}: expected images [b, c, H, W] (4 dims), got shape {tuple(x.shape)}; add a batch "
            "dimension with x[None] or move channels first"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"{what}: expected float images in [-1, 1], got dtype {x.dtype}; convert uint8 pixels "
            "with x.float() / 127.5 - 1"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{what}: the codec takes {channels}-channel images but got {x.shape[1]} channels "
            f"(shape {tuple(x.shape)}); convert the image (e.g. RGB <-> greyscale) or pick the matching codec"
        )
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{what}: empty image of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{what}: the image contains NaN or infinite values; check the upstream step"
        )


def check_codec_tokens(tokens: Any, codebook_size: int, what: str) -> torch.Tensor:
    """:func:`checks.check_tokens` in a codec's words: int64 ``[b, h, w]`` in
    ``[0, codebook_size)``."""
    return check_tokens(tokens, codebook_size, what, owner="this codec",
                        hint="the tokens come from another codec or prior; use the matching one")


def check_pad_mode(pad: str) -> None:
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {list(PAD_MODES)}, got {pad!r}")


# --------------------------------------------------------------------------------------------
# pixel codec
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PixelCodecConfig:
    """``levels`` grey levels per channel (2..65536), ``channels`` image channels."""

    levels: int = 256
    channels: int = 1

    def __post_init__(self) -> None:
        check_int(self.levels, "PixelCodec levels", minimum=2, maximum=65536)
        check_int(self.channels, "PixelCodec channels", minimum=1)

    @property
    def spec(self) -> str:
        return f"pixel:levels={self.levels},channels={self.channels}"


class PixelCodec(nn.Module):
    """Identity "codec" for pixel-level priors (factor 1, ``codebook_size = levels``).

    encode: ``x`` in [-1, 1] -> ``round((x + 1) / 2 * (levels - 1))`` (values outside [-1, 1]
    are clamped; halves round to even, as ``torch.round``); decode: ``t / (levels - 1) * 2 - 1``.
    Token layout for ``channels > 1``: channels are interleaved along the width,
    ``tokens[b, y, x * channels + c] = code of pixel (y, x), channel c`` (einops
    ``b c h w -> b h (w c)``), so a C-channel H x W image is an H x (W*C) grid over a
    ``levels``-sized vocabulary (not levels^C). Identified by the string
    ``spec`` ``"pixel:levels=256,channels=1"`` (``PixelCodec.from_spec``), which is what a prior's
    ``sundae.codec`` metadata records. No weights: nothing to save."""

    def __init__(self, levels: int = 256, channels: int = 1):
        super().__init__()
        self.config = PixelCodecConfig(levels=levels, channels=channels)

    @classmethod
    def from_config(cls, config: PixelCodecConfig | dict[str, Any]) -> PixelCodec:
        if isinstance(config, dict):
            config = config_from_dict(PixelCodecConfig, config, what="PixelCodecConfig")
        return cls(levels=config.levels, channels=config.channels)

    @classmethod
    def from_spec(cls, spec: str) -> PixelCodec:
        """Parse ``"pixel"``, ``"pixel:levels=16"`` or ``"pixel:levels=256,channels=3"``
        (keys in any order; missing keys take their defaults)."""
        if not isinstance(spec, str):
            raise ValueError(
                f"PixelCodec spec must be a string like 'pixel:levels=256,channels=1', got {spec!r}"
            )
        head, _, body = spec.strip().partition(":")
        if head.strip() != "pixel":
            raise ValueError(
                f"{spec!r} is not a pixel codec spec; expected 'pixel:levels=256,channels=1'"
            )
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in body.split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key not in ("levels", "channels"):
                raise ValueError(
                    f"pixel codec spec {spec!r}: bad item {item!r}; valid keys are levels= and channels="
                )
            if key in values:
                raise ValueError(f"pixel codec spec {spec!r}: {key} given twice")
            try:
                values[key] = int(value)
            except ValueError:
                raise ValueError(
                    f"pixel codec spec {spec!r}: {key} must be an integer, got {value!r}"
                ) from None
        return cls(**values)

    spec = config_property(
        "spec", "The codec's spec string (str), e.g. ``'pixel:levels=256,channels=1'``."
    )
    levels = config_property("levels", "Grey levels per channel (int).")
    codebook_size = config_property("levels", "Token vocabulary size (int): ``levels``.")
    in_channels = config_property("channels", "Image channels ``encode`` takes (int).")
    out_channels = config_property("channels", "Image channels ``decode`` gives (int).")

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side (int): always 1."""
        return 1

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        return height, width * self.config.channels

    def image_size(self, h: int, w: int) -> tuple[int, int]:
        if w % self.config.channels:
            raise ValueError(
                f"PixelCodec: a token grid width of {w} is not a multiple of channels={self.config.channels}"
            )
        return h, w // self.config.channels

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, pad: str = "replicate", tile: int | None = None,
               overlap: int | None = None) -> torch.Tensor:
        """Images ``[b, channels, H, W]`` float in [-1, 1] -> tokens ``[b, H, W*channels]`` int64.
        ``pad``, ``tile`` and ``overlap`` are accepted for interface parity (factor 1 never pads;
        every pixel is its own token, so there is nothing to tile)."""
        check_images(x, self.config.channels, "PixelCodec.encode")
        check_pad_mode(pad)
        top = self.config.levels - 1
        tokens = torch.round((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0 * top).long()
        return rearrange(tokens, "b c h w -> b h (w c)")

    @torch.no_grad()
    def decode(
        self, tokens: torch.Tensor, *, tile: int | None = None, overlap: int | None = None
    ) -> torch.Tensor:
        """Tokens ``[b, H, W*channels]`` -> images ``[b, channels, H, W]`` float32 in [-1, 1].
        ``tile``/``overlap`` are accepted for interface parity and ignored (nothing to tile)."""
        tokens = check_codec_tokens(tokens, self.config.levels, "PixelCodec.decode")
        c = self.config.channels
        if tokens.shape[-1] % c:
            raise ValueError(
                f"PixelCodec.decode: token grid width {tokens.shape[-1]} is not a multiple of channels={c} "
                "(channels are interleaved along the width)"
            )
        x = tokens.float() / (self.config.levels - 1) * 2.0 - 1.0
        return rearrange(x, "b h (w c) -> b c h w", c=c)

    def extra_repr(self) -> str:
        return self.spec
