"""Values that travel on the pack's custom sockets.

- ``SUNDAE_VQGAN``  -> :class:`CodecHandle` (a VQ-GAN or a pixel codec, plus its name)
- ``SUNDAE_PRIOR``  -> :class:`PriorHandle` (a SUNDAE prior, plus its name and codec hint)
- ``SUNDAE_TOKENS`` -> :class:`TokenBatch` (tokens, optional regenerate-mask, codec factor)

All three are frozen: ComfyUI caches node outputs and hands the same object to every consumer
and every later run, so nothing may be edited in place. Derive new values with
``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

VQGAN_TYPE = "SUNDAE_VQGAN"
PRIOR_TYPE = "SUNDAE_PRIOR"
TOKENS_TYPE = "SUNDAE_TOKENS"


@dataclass(frozen=True, eq=False)
class CodecHandle:
    """A loaded codec. ``model`` has ``encode``/``decode``, ``downsample_factor``,
    ``codebook_size`` and ``in_channels``; it sits on ``device`` in ``dtype`` and must not be
    moved or modified by consumers."""

    model: torch.nn.Module
    name: str  # the dropdown entry it was loaded from
    device: torch.device
    dtype: torch.dtype
    source: str | None = None  # the VQ-GAN file or folder (None: a pixel codec); for its sha256

    @property
    def factor(self) -> int:
        return int(self.model.downsample_factor)

    @property
    def codebook_size(self) -> int:
        return int(self.model.codebook_size)

    @property
    def in_channels(self) -> int:
        return int(self.model.in_channels)

    @property
    def codec_id(self) -> str:
        """Names the codec in messages and on the tokens it makes."""
        return f"{self.name} ({self.codebook_size} codes, factor {self.factor})"


@dataclass(frozen=True, eq=False)
class PriorHandle:
    """A loaded SUNDAE prior on ``device`` in ``dtype`` (read-only for consumers).

    ``codec`` is the file's ``sundae.codec`` metadata (e.g. ``pixel:levels=256,channels=1``)
    when present; ``factor`` the codec's downsampling factor when the metadata tells it."""

    model: torch.nn.Module
    name: str
    device: torch.device
    dtype: torch.dtype
    codec: str | None = None
    factor: int | None = None

    @property
    def codebook_size(self) -> int:
        return int(self.model.codebook_size)


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """Tokens plus what is needed to decode and inpaint them.

    tokens: int64 ``[b, h, w]`` on the CPU.
    mask: bool ``[m, h, w]`` (True = regenerate) with ``m`` dividing ``b`` — mask ``i`` covers the
        ``b / m`` consecutive grids ``i*b/m ...`` (``m = 1``: one mask for all, ``m = b``: one
        each; the sampler's rule, so its output keeps the input's mask) — or None (no mask).
    factor: pixels per token along each axis (1 for pixel codecs), or None when unknown (tokens
        sampled with neither a VQ-GAN connected nor a factor in the prior's metadata; Decode
        then takes its codec's factor).
    image_size: ``(H, W)`` of the image the tokens were encoded from, when it differs from or
        must be kept apart from ``(h * factor, w * factor)``; Decode crops to it. None = the full
        grid.
    codec_id: the codec that made the tokens (see :attr:`CodecHandle.codec_id`), or None.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None
    factor: int | None
    image_size: tuple[int, int] | None = None
    codec_id: str | None = None

    def __post_init__(self):
        t = self.tokens
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.dtype != torch.int64:
            raise ValueError(
                "TokenBatch.tokens must be an int64 tensor [b, h, w], got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
        if self.mask is not None:
            m = self.mask
            if (not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.ndim != 3
                    or tuple(m.shape[1:]) != tuple(t.shape[1:]) or m.shape[0] == 0 or t.shape[0] % m.shape[0]):
                raise ValueError(
                    f"TokenBatch.mask must be a bool tensor [m, h, w] over the tokens' grid {tuple(t.shape[1:])} "
                    f"with m dividing their batch {t.shape[0]}, got "
                    f"{getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}"
                )
        if self.factor is not None and int(self.factor) < 1:
            raise ValueError(f"TokenBatch.factor must be >= 1, got {self.factor}")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.tokens.shape[1]), int(self.tokens.shape[2])

    @property
    def pixel_size(self) -> tuple[int, int]:
        """``(H, W)`` of the decoded image: ``image_size`` if set, else the full grid."""
        if self.image_size is not None:
            return self.image_size
        if self.factor is None:
            raise ValueError("TokenBatch.pixel_size: the codec factor of these tokens is unknown")
        return self.grid[0] * self.factor, self.grid[1] * self.factor

    def replace(self, **changes) -> TokenBatch:
        return dataclasses.replace(self, **changes)
