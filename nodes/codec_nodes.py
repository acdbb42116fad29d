"""VQ-GAN Encode and VQ-GAN Decode: IMAGE <-> SUNDAE_TOKENS."""

from __future__ import annotations

import logging

import torch

from ..sundae_lib.checks import check_tokens
from . import comfy_adapter as comfy
from .convert import codec_to_image, image_to_codec, tokens_on
from .types import TOKENS_TYPE, VQGAN_TYPE, CodecHandle, TokenBatch

logger = logging.getLogger(__name__)

MIN_TILE = 64  # pixels; the OOM fallback halves the tile down to this, then gives up


class SundaeEncode:
    DESCRIPTION = (
        "Encodes images into VQ-GAN tokens (one token per factor × factor pixel cell) for "
        "inpainting and variations. Sizes that are not a multiple of the codec factor are "
        "padded by repeating the edge (right and bottom) and cropped back by VQ-GAN Decode. Large "
        "images can be encoded in tiles to save memory; if the device (GPU or CPU) runs out of "
        "memory the tile is halved until it fits."
    )
    CATEGORY = "sundae"
    RETURN_TYPES = (TOKENS_TYPE,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("The image's tokens, without a mask (add one with Latent Mask).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vqgan": (VQGAN_TYPE, {"tooltip": "The codec to encode with: the one the prior was trained on."}),
                "image": ("IMAGE", {"tooltip": "The images to encode (a larger image gives more tokens)."}),
                "tile_size": (
                    "INT",
                    {
                        "default": 0, "min": 0, "max": 8192, "step": 64,
                        "tooltip": "Encode in overlapping tiles of this many pixels per side (0 = the "
                        "whole image at once); smaller tiles use less memory; each token comes from "
                        "the tile it is most central in.",
                    },
                ),
            }
        }

    def encode(self, vqgan: CodecHandle, image: torch.Tensor, tile_size: int = 0):
        x, size = image_to_codec(image, vqgan, node="SundaeEncode")
        grid_px = max(x.shape[-2:])
        tokens = with_tile_fallback(
            lambda tile: vqgan.model.encode(x, tile=max(1, tile // vqgan.factor)) if tile else vqgan.model.encode(x),
            grid_px, tile_size, node="SundaeEncode",
        )
        batch = TokenBatch(
            tokens=tokens.to("cpu", torch.long), mask=None, factor=vqgan.factor, image_size=size,
            codec_id=vqgan.codec_id,
        )
        logger.info("SundaeEncode: %dx%d px -> %dx%d tokens with %s", size[1], size[0], batch.grid[1], batch.grid[0], vqgan.codec_id)
        return (batch,)


def with_tile_fallback(run, grid_px: int, tile_px: int, *, node: str):
    """``run(tile_px)`` (0 = untiled), retried with the tile halved (down to ``MIN_TILE`` pixels)
    when the device runs out of memory: CUDA's ``OutOfMemoryError`` or the CPU allocator's plain
    ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"). Other errors propagate."""
    tile = tile_px if 0 < tile_px < grid_px else 0
    while True:
        try:
            return run(tile)
        except (RuntimeError, *comfy.oom_exceptions()) as exc:
            if not comfy.is_out_of_memory(exc):
                raise
            comfy.soft_empty_cache()
            tile = (tile or grid_px) // 2
            if tile < MIN_TILE:
                raise
            logger.warning("%s: out of memory, retrying with %d px tiles", node, tile)


def check_tokens_fit_codec(tokens: TokenBatch, vqgan: CodecHandle, *, node: str) -> None:
    """Fail with a teaching message when tokens cannot come from this codec."""
    if tokens.factor is not None and tokens.factor != vqgan.factor:
        raise ValueError(
            f"{node}: the tokens were made for a factor-{tokens.factor} codec"
            f"{f' ({tokens.codec_id})' if tokens.codec_id else ''} but the VQ-GAN {vqgan.name!r} has "
            f"factor {vqgan.factor} — load the VQ-GAN the tokens' prior was trained on"
        )
    check_tokens(tokens.tokens, vqgan.codebook_size, node, owner=f"the VQ-GAN {vqgan.name!r}",
                 hint="load the VQ-GAN the prior was trained on")
    if tokens.codec_id and tokens.codec_id != vqgan.codec_id:
        logger.warning("%s: tokens were made with %s, decoding with %s", node, tokens.codec_id, vqgan.codec_id)


class SundaeDecode:
    DESCRIPTION = (
        "Decodes SUNDAE tokens into images with the VQ-GAN. Large images can be decoded in tiles "
        "to save memory; if the device (GPU or CPU) runs out of memory the tile is halved and decoding "
        "retried."
    )
    CATEGORY = "sundae"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images, RGB 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vqgan": (VQGAN_TYPE, {"tooltip": "The codec to decode with: the one the prior was trained on."}),
                "tokens": (TOKENS_TYPE, {"tooltip": "The tokens to turn into images."}),
                "tile_size": (
                    "INT",
                    {
                        "default": 0, "min": 0, "max": 8192, "step": 64,
                        "tooltip": "Decode in tiles of this many pixels per side (0 = the whole "
                        "image at once); smaller tiles use less memory but take longer.",
                    },
                ),
            }
        }

    def decode(self, vqgan: CodecHandle, tokens: TokenBatch, tile_size: int = 0):
        check_tokens_fit_codec(tokens, vqgan, node="SundaeDecode")
        if tokens.factor is None:  # sampled without knowing the codec: it is this one
            tokens = tokens.replace(factor=vqgan.factor)
        t = tokens_on(tokens.tokens, vqgan.device)
        grid_px = max(tokens.grid) * tokens.factor
        x = with_tile_fallback(lambda tile: self._decode(vqgan, t, tile), grid_px, tile_size, node="SundaeDecode")
        return (codec_to_image(x, tokens.pixel_size, device=comfy.intermediate_device()),)

    @staticmethod
    def _decode(vqgan: CodecHandle, tokens: torch.Tensor, tile_px: int) -> torch.Tensor:
        if tile_px:
            return vqgan.model.decode(tokens, tile=max(1, tile_px // vqgan.factor))
        return vqgan.model.decode(tokens)
