"""Latent Mask: a pixel MASK -> the token mask that tells the sampler what to regenerate."""

from __future__ import annotations

import logging

import torch
from einops import repeat

from ..sundae_lib.masks import RULES, token_mask_from_pixels
from .types import TOKENS_TYPE, TokenBatch

logger = logging.getLogger(__name__)


class SundaeLatentMask:
    DESCRIPTION = (
        "Attaches an inpainting mask to tokens: the MASK (1 = regenerate, any size — it is "
        "resized to the image) is reduced to the token grid by a rule and grown by whole tokens. "
        "An empty mask regenerates nothing; a full mask is plain generation."
    )
    CATEGORY = "sundae"
    RETURN_TYPES = (TOKENS_TYPE,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("The same tokens with the regenerate-mask attached (replacing any earlier mask).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens": (TOKENS_TYPE, {"tooltip": "Tokens of the image to inpaint (from VQ-GAN Encode)."}),
                "mask": ("MASK", {"tooltip": "Pixels to regenerate (1 = regenerate); painted areas of a Load Image alpha channel are 1."}),
                "rule": (
                    list(RULES),
                    {
                        "default": "any",
                        "tooltip": "When a token is regenerated: 'any' masked pixel in its cell "
                        "(regenerates most), 'all' pixels masked (the SUNDAE paper's rule, "
                        "regenerates least), or 'coverage' of at least the threshold.",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {
                        "default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                        "tooltip": "For the 'coverage' rule: the fraction of a token's pixels that "
                        "must be masked; lower regenerates more tokens.",
                    },
                ),
                "grow": (
                    "INT",
                    {
                        "default": 0, "min": 0, "max": 64, "step": 1,
                        "tooltip": "Grow the token mask by this many tokens in every direction; "
                        "more blends the new content into a wider border.",
                    },
                ),
            }
        }

    def apply(self, tokens: TokenBatch, mask: torch.Tensor, rule: str = "any", threshold: float = 0.5, grow: int = 0):
        if tokens.factor is None:
            raise ValueError(
                "SundaeLatentMask: these tokens do not know their codec factor (sampled without a "
                "VQ-GAN) — connect the VQ-GAN to the sampler, or mask tokens from VQ-GAN Encode"
            )
        token_mask = token_mask_from_pixels(
            mask.detach().to("cpu"), factor=tokens.factor, grid=tokens.grid, rule=rule,
            threshold=threshold, grow=grow, image_size=tokens.pixel_size,
        )
        # one mask serves every image as it is ([1, h, w]; the sampler spreads it); several masks
        # over one image repeat the image, one per mask
        t, b_mask = tokens.tokens, token_mask.shape[0]
        if b_mask not in (1, t.shape[0]):
            if t.shape[0] != 1:
                raise ValueError(
                    f"SundaeLatentMask: the mask batch ({b_mask}) and the tokens batch ({t.shape[0]}) "
                    "differ; give one mask, one image, or equally many of both"
                )
            t = repeat(t, "1 h w -> b h w", b=b_mask).clone()
        logger.info(
            "SundaeLatentMask: %d of %d tokens to regenerate (rule %s, grow %d)",
            int(token_mask.sum()), token_mask.numel(), rule, grow,
        )
        return (tokens.replace(tokens=t, mask=token_mask),)
