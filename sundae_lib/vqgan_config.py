"""``VQGANConfig``: the taming VQ-GAN's strict dataclass config and its named presets.

Field names are taming's ``ddconfig`` plus the quantizer's settings; ``__post_init__`` checks
every value (and that the widths suit GroupNorm, attention sits on a real level, ...), so a
config that exists builds a ``VQGAN`` (``vqgan.py``; the blocks in ``vqgan_modules.py``, which
import this module only). No torch here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .checks import check_bool, check_int, check_number, is_int
from .config_dict import config_from_dict

__all__ = ["VQGANConfig"]

PIXEL_RANGES = ("-1,1", "0,1")
QUANTIZERS = ("vq", "gumbel")
# Config limits, far above any published VQ-GAN (taming: 5 levels, 2 blocks): a file beyond
# them is refused when read; the parameter count is bounded by _helpers.MAX_PARAMETERS.
MAX_LEVELS = 10  # len(ch_mult): downsample factor up to 512
MAX_RES_BLOCKS = 32  # num_res_blocks per level


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """A taming VQ-GAN. Field names are taming's ``ddconfig`` plus the quantizer's settings;
    defaults are taming's ImageNet f16-1024 model (the ``taming-f16-1024`` preset).

    ``attn_resolutions`` are feature-map sizes relative to ``resolution`` (taming's convention;
    only their ratio matters, see ``attn_levels``). ``remap_used > 0`` means taming's remap: a
    ``quantize.used`` buffer of that many code indices, and tokens index that reduced vocabulary.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    embed_dim: int = 256
    n_embed: int = 1024
    norm_groups: int = 32
    mid_attention: bool = True
    resamp_with_conv: bool = True
    pixel_range: str = "-1,1"
    quantizer: str = "vq"
    remap_used: int = 0

    def __post_init__(self) -> None:
        for name in ("ch_mult", "attn_resolutions"):  # JSON lists and user lists -> tuples
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name, minimum in (
            ("ch", 1),
            ("num_res_blocks", 1),
            ("resolution", 1),
            ("z_channels", 1),
            ("in_channels", 1),
            ("out_ch", 1),
            ("embed_dim", 1),
            ("n_embed", 1),
            ("norm_groups", 1),
            ("remap_used", 0),
        ):
            check_int(getattr(self, name), f"VQGANConfig.{name}", minimum=minimum)
        for name in ("double_z", "mid_attention", "resamp_with_conv"):
            check_bool(getattr(self, name), f"VQGANConfig.{name}")
        if not isinstance(self.ch_mult, tuple) or not self.ch_mult:
            raise ValueError(
                f"VQGANConfig.ch_mult must be a non-empty list of integers, got {self.ch_mult!r}"
            )
        if len(self.ch_mult) > MAX_LEVELS or self.num_res_blocks > MAX_RES_BLOCKS:
            raise ValueError(
                f"VQGANConfig: {len(self.ch_mult)} levels (ch_mult) of {self.num_res_blocks} blocks "
                f"(num_res_blocks) exceed the limits of {MAX_LEVELS} levels (MAX_LEVELS) and "
                f"{MAX_RES_BLOCKS} blocks (MAX_RES_BLOCKS); the config is wrong — check the file"
            )
        for m in self.ch_mult:
            if not is_int(m) or m < 1:
                raise ValueError(
                    f"VQGANConfig.ch_mult entries must be integers >= 1, got {self.ch_mult!r}"
                )
        if not isinstance(self.attn_resolutions, tuple) or any(
            not is_int(r) for r in self.attn_resolutions
        ):
            raise ValueError(
                f"VQGANConfig.attn_resolutions must be a list of integers, got {self.attn_resolutions!r}"
            )
        check_number(self.dropout, "VQGANConfig.dropout", low=0, high=1, high_open=True)
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(
                    f"VQGANConfig: width ch*ch_mult = {self.ch}*{m} = {self.ch * m} is not divisible "
                    f"by norm_groups={self.norm_groups}; GroupNorm needs every width to be a multiple "
                    "of the group count — change ch/ch_mult or norm_groups"
                )
        if self.ch % self.norm_groups:
            raise ValueError(
                f"VQGANConfig: ch={self.ch} is not divisible by norm_groups={self.norm_groups}"
            )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"VQGANConfig.resolution={self.resolution} must be a multiple of the downsample factor "
                f"{self.downsample_factor} (2^(len(ch_mult)-1)); it only serves to place attention"
            )
        level_sizes = [self.resolution // 2**i for i in range(len(self.ch_mult))]
        stray = [r for r in self.attn_resolutions if r not in level_sizes]
        if stray:
            raise ValueError(
                f"VQGANConfig.attn_resolutions {list(stray)} match no level: with resolution "
                f"{self.resolution} and {len(self.ch_mult)} levels the feature-map sizes are "
                f"{level_sizes}; use some of those (or [] for no attention)"
            )
        if self.double_z:
            raise ValueError(
                "VQGANConfig.double_z=True is a KL-autoencoder setting (mean and log-variance); a "
                "VQ-GAN encoder emits z_channels — set double_z to false"
            )
        if self.pixel_range not in PIXEL_RANGES:
            raise ValueError(
                f"VQGANConfig.pixel_range must be one of {list(PIXEL_RANGES)}, got {self.pixel_range!r}"
            )
        if self.quantizer not in QUANTIZERS:
            raise ValueError(
                f"VQGANConfig.quantizer must be one of {list(QUANTIZERS)}, got {self.quantizer!r}"
            )
        if self.quantizer == "gumbel" and self.z_channels != self.embed_dim:
            raise ValueError(
                f"VQGANConfig: the gumbel quantizer needs z_channels == embed_dim (its proj takes "
                f"the quant_conv output), got z_channels={self.z_channels}, embed_dim={self.embed_dim}"
            )
        if self.remap_used > self.n_embed:
            raise ValueError(
                f"VQGANConfig.remap_used={self.remap_used} exceeds n_embed={self.n_embed}: the remap "
                "lists a subset of the codebook"
            )

    @property
    def downsample_factor(self) -> int:
        """f = 2^(len(ch_mult) - 1): pixels per token along each axis."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def attn_levels(self) -> tuple[int, ...]:
        """Level indices i (0 = full resolution) with self-attention: resolution / 2^i is in
        ``attn_resolutions``."""
        return tuple(
            i for i in range(len(self.ch_mult)) if self.resolution // 2**i in self.attn_resolutions
        )

    @property
    def codebook_size(self) -> int:
        """Token vocabulary: ``remap_used`` with remap, else ``n_embed``."""
        return self.remap_used if self.remap_used > 0 else self.n_embed

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQGANConfig:
        """Strict: unknown keys are an error listing the valid ones."""
        return config_from_dict(cls, data, what="VQGANConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VQGANConfig:
        """A named configuration, optionally with fields overridden: ``preset("ldm-vq-f8",
        n_embed=256)``. Names: see ``VQGANConfig.presets()``."""
        if name not in _PRESETS:
            raise ValueError(
                f"unknown VQGANConfig preset {name!r}; choose one of {sorted(_PRESETS)}"
            )
        return config_from_dict(
            cls, {**_PRESETS[name], **overrides}, what=f"VQGANConfig.preset({name!r})"
        )

    @staticmethod
    def presets() -> list[str]:
        return sorted(_PRESETS)


_PRESETS: dict[str, dict[str, Any]] = {
    # taming ImageNet f16 with 1024 codes (the class defaults)
    "taming-f16-1024": {},
    # latent-diffusion first stages (models/first_stage_models/vq-*/config.yaml)
    "ldm-vq-f4": dict(
        ch_mult=(1, 2, 4), attn_resolutions=(), z_channels=3, embed_dim=3, n_embed=8192
    ),
    "ldm-vq-f8": dict(
        ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), z_channels=4, embed_dim=4, n_embed=16384
    ),
    "ldm-vq-f16": dict(
        ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=8, embed_dim=8, n_embed=16384
    ),
    # McKinney & Willcocks' FFHQ 1024 f32 VQ-GAN (32x32 tokens per 1024^2 image)
    "ffhq1024-f32": dict(
        ch=128,
        ch_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=1,
        attn_resolutions=(64,),
        resolution=1024,
        z_channels=256,
        embed_dim=256,
        n_embed=8192,
    ),
    # aMUSEd VQ (diffusers amused/amused-256 vqvae): no attention anywhere, pixels in 0..1
    "amused": dict(
        ch_mult=(1, 2, 2, 4, 6),
        attn_resolutions=(),
        mid_attention=False,
        z_channels=64,
        embed_dim=64,
        n_embed=8192,
        pixel_range="0,1",
    ),
    # 28x28 grey digits -> 7x7 tokens
    "mnist-f4": dict(
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        resolution=28,
        z_channels=32,
        in_channels=1,
        out_ch=1,
        embed_dim=32,
        n_embed=256,
        norm_groups=8,
    ),
    # unit tests: f2, attention at the low-resolution level
    "tiny": dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                 z_channels=8, embed_dim=8, n_embed=32, norm_groups=4),
}
