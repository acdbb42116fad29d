"""Taming-layout VQ-GAN state dicts, whatever file they came from: pick the VQ tensors out of a
checkpoint, refuse foreign architectures, normalise the quantizer's keys and infer the
``VQGANConfig`` fields exactly from the tensor shapes.
``vqgan_loading.load_vqgan`` reads the files and runs these on what they hold (diffusers key
conversion: ``vqgan_formats.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .vqgan_formats import NOMINAL_RESOLUTION

__all__ = [
    "FORMATS",
    "infer_vqgan_config",
    "normalize_quantizer",
    "refuse_foreign",
    "select_vq_tensors",
    "unwrap_container",
]

logger = logging.getLogger(__name__)

FORMATS = (
    "a native or taming-layout .safetensors, a taming / latent-diffusion .ckpt or .pth, a "
    "diffusers VQModel folder (config.json + weights), or hf://owner/repo[/subfolder][/file]"
)
KEEP_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
# EMA statistics of taming's EMAVectorQuantizer and VQ-Diffusion's quantizer: training state
EMA_QUANTIZER_KEYS = (
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
    "quantize.cluster_size",
    "quantize.embed_avg",
    "quantize.embedding_avg",
)


# --------------------------------------------------------------------------------------------
# state dicts: unwrap, select, refuse, convert
# --------------------------------------------------------------------------------------------


def unwrap_container(obj: Any, path: Path) -> dict[str, Any]:
    """The weights inside a torch checkpoint: Lightning ``state_dict``, VQ-Diffusion ``model`` or
    the dict itself. Every other top-level entry (callbacks, optimizer state, ...) is ignored."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"load_vqgan: {str(path)!r} holds a pickled {type(obj).__name__}, not a dict of weights "
            "(a whole pickled model?); export its state_dict to .safetensors and load that"
        )
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            logger.debug("load_vqgan: %s: using the %r entry", path.name, key)
            return dict(inner)
    return dict(obj)


def _strip_wrapper_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    """Remove a DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def select_vq_tensors(sd: Mapping[str, Any], origin: str, fmt: str) -> dict[str, torch.Tensor]:
    """Keep-list (source 3 of ``vqgan_loading``'s docstring): ``first_stage_model.*`` of
    combined models, then the VQ families."""
    sd = _strip_wrapper_prefix({str(k): v for k, v in sd.items()})
    if any(k.startswith(("encoder.blocks.", "generator.blocks.")) for k in sd):
        raise ValueError(
            f"load_vqgan: {origin} ({fmt}) uses the unleashing-transformers VQGAN layout "
            "(encoder.blocks.N / generator.blocks.N), a different architecture that cannot be loaded"
        )
    first_stage = {
        k[len("first_stage_model.") :]: v
        for k, v in sd.items()
        if k.startswith("first_stage_model.")
    }
    if first_stage:
        logger.info("load_vqgan: %s: combined checkpoint, using its first_stage_model", origin)
        sd = first_stage
    kept = {k: v for k, v in sd.items() if k.startswith(KEEP_PREFIXES)}
    dropped = sorted({k.split(".", 1)[0] for k in sd} - {p.rstrip(".") for p in KEEP_PREFIXES})
    if dropped:
        logger.info("load_vqgan: %s: ignoring non-VQ entries %s", origin, dropped)
    if not kept:
        families = dropped[:12] or "nothing"
        raise ValueError(
            f"load_vqgan: {origin} ({fmt}) holds no VQ-GAN weights (no encoder./decoder./quantize. "
            f"keys; top-level names: {families}); is it the right file? expected {FORMATS}"
        )
    bad = sorted(k for k, v in kept.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(
            f"load_vqgan: {origin}: entries {bad[:8]} are not tensors; the file is not a VQ-GAN state dict"
        )
    return kept


def refuse_foreign(sd: Mapping[str, torch.Tensor], origin: str, fmt: str) -> None:
    keys = list(sd)
    if any(re.search(r"\.(norm_layer|conv_y|conv_b)\.", k) for k in keys):
        raise ValueError(
            f"load_vqgan: {origin} ({fmt}) is a MoVQ model (spatially conditioned norms, e.g. "
            "Kandinsky's movq): its decoder norms depend on the quantized latent, so it is not a "
            "taming-style VQ-GAN and cannot be loaded"
        )
    if any(re.search(r"\.(to_qkv|to_out)\.", k) and ".attn" in k for k in keys):
        raise ValueError(
            f"load_vqgan: {origin} ({fmt}) uses latent-diffusion linear attention (attn_type: "
            "linear, to_qkv/to_out keys), which has no taming equivalent; use a vanilla-attention model"
        )
    if not any(k.startswith("quantize.") for k in keys):
        kl = (
            "quant_conv.weight" in sd
            and "post_quant_conv.weight" in sd
            and (sd["quant_conv.weight"].shape[0] == 2 * sd["post_quant_conv.weight"].shape[1])
        )
        raise ValueError(
            f"load_vqgan: {origin} ({fmt}) has no quantizer (quantize.* keys)"
            + (
                ": it is a KL autoencoder (AutoencoderKL), a continuous-latent model, not a VQ codec"
                if kl
                else ""
            )
            + "; pick a VQ-GAN checkpoint"
        )


def normalize_quantizer(sd: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """VQ-Diffusion's bare ``quantize.embedding`` -> ``.weight``; drop EMA statistics."""
    if "quantize.embedding" in sd and "quantize.embedding.weight" not in sd:
        sd["quantize.embedding.weight"] = sd.pop("quantize.embedding")
    dropped = [k for k in EMA_QUANTIZER_KEYS if sd.pop(k, None) is not None]
    if dropped:
        logger.info("load_vqgan: %s: dropping EMA codebook statistics %s", origin, dropped)
    return sd


# --------------------------------------------------------------------------------------------
# config inference from tensor shapes
# --------------------------------------------------------------------------------------------


def _indices(sd: Mapping[str, Any], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def infer_vqgan_config(
    sd: Mapping[str, torch.Tensor], *, origin: str = "state dict"
) -> dict[str, Any]:
    """``VQGANConfig`` fields from a taming-layout state dict (exact for every taming / LDM VQ).

    ``norm_groups`` is ``None`` (not stored in weights); ``resolution`` is the nominal 256 (or
    2^(L-1) if larger) and ``attn_resolutions`` place attention at the levels that have it."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(
                f"load_vqgan: {origin}: missing {key!r}; the weights are incomplete or not a taming VQ-GAN"
            )
        return tuple(sd[key].shape)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"load_vqgan: {origin}: encoder levels {levels} are not 0..L-1")
    num_levels = len(levels)
    ch_mult, num_res_blocks = [], None
    for i in levels:
        width = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % ch:
            raise ValueError(
                f"load_vqgan: {origin}: level {i} width {width} is not a multiple of ch={ch} "
                "(conv_in output); taming needs widths ch*ch_mult[i] — a diffusers model needs "
                "block_out_channels that are multiples of block_out_channels[0]"
            )
        ch_mult.append(width // ch)
        blocks = _indices(sd, rf"encoder\.down\.{i}\.block\.(\d+)\.")
        if num_res_blocks is None:
            num_res_blocks = len(blocks)
        if blocks != list(range(num_res_blocks)):
            raise ValueError(
                f"load_vqgan: {origin}: encoder level {i} has blocks {blocks}, level 0 has "
                f"{num_res_blocks}; every level must have num_res_blocks blocks"
            )
    z_channels = shape("decoder.conv_in.weight")[1]
    enc_out = shape("encoder.conv_out.weight")[0]
    if enc_out not in (z_channels, 2 * z_channels):
        raise ValueError(
            f"load_vqgan: {origin}: encoder.conv_out emits {enc_out} channels but decoder.conv_in "
            f"takes {z_channels}; encoder and decoder do not belong together"
        )
    if "quantize.proj.weight" in sd:
        quantizer, n_embed, embed_dim = (
            "gumbel",
            shape("quantize.proj.weight")[0],
            shape("quantize.embed.weight")[1],
        )
    else:
        quantizer = "vq"
        n_embed, embed_dim = shape("quantize.embedding.weight")
    if shape("quant_conv.weight")[0] != embed_dim:
        raise ValueError(
            f"load_vqgan: {origin}: quant_conv emits {shape('quant_conv.weight')[0]} channels but the "
            f"codebook vectors have {embed_dim}; the quantizer does not belong to this encoder"
        )
    attn_levels = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    mid_attention = "encoder.mid.attn_1.q.weight" in sd
    _check_decoder(sd, origin, num_levels, num_res_blocks, attn_levels, mid_attention)
    resolution = max(NOMINAL_RESOLUTION, 2 ** (num_levels - 1))
    return dict(
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(resolution // 2**i for i in attn_levels),
        resolution=resolution,
        z_channels=z_channels,
        in_channels=in_channels,
        out_ch=shape("decoder.conv_out.weight")[0],
        dropout=0.0,
        double_z=enc_out == 2 * z_channels and enc_out != z_channels,
        embed_dim=embed_dim,
        n_embed=n_embed,
        norm_groups=None,
        mid_attention=mid_attention,
        resamp_with_conv=num_levels == 1 or "encoder.down.0.downsample.conv.weight" in sd,
        pixel_range="-1,1",
        quantizer=quantizer,
        remap_used=int(sd["quantize.used"].numel()) if "quantize.used" in sd else 0,
    )


def _check_decoder(sd, origin, num_levels, num_res_blocks, attn_levels, mid_attention) -> None:
    """Encoder-derived structure must match the decoder's; name the differing part."""
    dec_levels = _indices(sd, r"decoder\.up\.(\d+)\.")
    if dec_levels != list(range(num_levels)):
        raise ValueError(
            f"load_vqgan: {origin}: decoder levels {dec_levels} differ from the encoder's 0..{num_levels - 1}"
        )
    for i in dec_levels:
        blocks = _indices(sd, rf"decoder\.up\.{i}\.block\.(\d+)\.")
        if blocks != list(range(num_res_blocks + 1)):
            raise ValueError(
                f"load_vqgan: {origin}: decoder.up.{i} has blocks {blocks}; with num_res_blocks="
                f"{num_res_blocks} (encoder) the decoder needs {num_res_blocks + 1}"
            )
    dec_attn = [i for i in dec_levels if f"decoder.up.{i}.attn.0.q.weight" in sd]
    if dec_attn != attn_levels:
        raise ValueError(
            f"load_vqgan: {origin}: decoder attention levels {dec_attn} differ from the encoder's "
            f"{attn_levels}; our VQGANConfig needs the same attention levels on both sides"
        )
    if ("decoder.mid.attn_1.q.weight" in sd) != mid_attention:
        raise ValueError(
            f"load_vqgan: {origin}: encoder and decoder disagree on mid-block attention"
        )
