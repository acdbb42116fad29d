"""Pixel masks -> token masks for inpainting.

Pure tensor helpers shared by the ComfyUI ``Latent Mask`` node and ``sundae-train inpaint``.
Polarity everywhere: **True / 1 = regenerate**, False / 0 = keep (ComfyUI's MASK convention;
the official code's ``inpaint_mask`` is the inverse).

The path of a mask, from the user's pixels to the sampler's ``torch.where`` (three files between
the node's input and the sampler; one conversion, one broadcast, one empty-mask shortcut):

1. ``nodes/mask_node.py`` (Latent Mask: MASK ``[B, H, W]``) or ``trainer/sample_cmd.py``
   (``inpaint --mask / --box``) calls :func:`token_mask_from_pixels` (here): pixels -> bool
   token mask ``[m, h, w]``, the only pixel-to-token conversion (the CLI passes a pixel
   codec's interleaved ``channels``; the node's codec list holds VQ-GANs and grey, 1-channel
   pixel codecs, for which the default ``channels=1`` is right).
2. ``nodes/types.py``: the node attaches it to the tokens as ``TokenBatch.mask``, unrepeated
   (``m = 1``: one mask for every image; one image with several masks is repeated per mask).
3. ``nodes/sampler_node.py`` passes tokens and mask as they are to ``sample()`` with
   ``batch_size = n * B`` (n samples per input image).
4. ``sampler.py``: ``sample()`` spreads init tokens and mask over the sample batch (``_spread``,
   the one broadcast), returns the input for an all-False mask (the one shortcut), and keeps the
   unmasked tokens with ``torch.where`` at the start and at every step.

Axis legend (einops): ``b`` batch, ``h``/``w`` token grid, ``fh``/``fw`` the ``factor × factor``
pixel cell behind one token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

RULES = ("any", "all", "coverage")

# A pixel counts as "masked" for the any/all rules when its value is at least this (ComfyUI's
# VAEEncodeForInpaint rounds its mask the same way); the coverage rule uses the soft values.
PIXEL_ON = 0.5


def _as_batch(mask: torch.Tensor, *, what: str) -> torch.Tensor:
    """``[H, W]`` or ``[b, H, W]`` (bool or float) -> float ``[b, H, W]``."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor mask, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(
            f"{what}: mask must be [H, W] or [b, H, W], got shape {tuple(mask.shape)}; "
            "squeeze extra axes (a ComfyUI MASK is [B, H, W])"
        )
    if mask.shape[-1] == 0 or mask.shape[-2] == 0 or mask.shape[0] == 0:
        raise ValueError(f"{what}: mask has an empty axis, shape {tuple(mask.shape)}")
    return mask.float()


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a pixel mask to ``size = (H, W)``.

    mask: ``[H0, W0]`` or ``[b, H0, W0]``, bool or float in 0..1. Returns float ``[b, H, W]``
    in 0..1 (``b = 1`` for a 2-D input). Bilinear, with antialiasing when shrinking so that a thin
    stroke is averaged rather than skipped; an unchanged size returns the values as float.
    """
    m = _as_batch(mask, what="resize_mask")
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"resize_mask: size must be (H, W) with both >= 1, got {tuple(size)}")
    target = (int(size[0]), int(size[1]))
    if tuple(m.shape[-2:]) == target:
        return m
    shrinking = target[0] < m.shape[-2] or target[1] < m.shape[-1]
    out = F.interpolate(
        rearrange(m, "b h w -> b 1 h w"),
        size=target,
        mode="bilinear",
        align_corners=False,
        antialias=shrinking,
    )
    return rearrange(out, "b 1 h w -> b h w").clamp(0.0, 1.0)


def fit_mask_to_grid(mask: torch.Tensor, *, image_size: Sequence[int], factor: int, grid: Sequence[int]) -> torch.Tensor:
    """Bring a mask drawn over an image of ``image_size = (H, W)`` onto the padded/cropped canvas
    ``grid * factor`` the codec actually encoded.

    The mask is first resized to the image (any size works, e.g. LoadImage's 64×64 zero mask),
    then extended by edge replication where the canvas is larger than the image (the codec pads
    images the same way) or cropped where it is smaller. Returns float ``[b, gh*f, gw*f]``.
    """
    m = resize_mask(mask, image_size)
    canvas = (int(grid[0]) * int(factor), int(grid[1]) * int(factor))
    m = m[:, : canvas[0], : canvas[1]]
    pad_h, pad_w = canvas[0] - m.shape[-2], canvas[1] - m.shape[-1]
    if pad_h or pad_w:
        m = F.pad(rearrange(m, "b h w -> b 1 h w"), (0, pad_w, 0, pad_h), mode="replicate")
        m = rearrange(m, "b 1 h w -> b h w")
    return m


def grow_token_mask(mask: torch.Tensor, grow: int) -> torch.Tensor:
    """Dilate a bool token mask ``[b, h, w]`` by ``grow`` tokens in every direction (a square,
    Chebyshev neighbourhood: diagonals included). ``grow = 0`` returns the mask unchanged."""
    if grow < 0:
        raise ValueError(f"grow must be >= 0 tokens, got {grow}")
    if grow == 0:
        return mask
    x = rearrange(mask.float(), "b h w -> b 1 h w")
    x = F.max_pool2d(x, kernel_size=2 * grow + 1, stride=1, padding=grow)
    return rearrange(x, "b 1 h w -> b h w") > 0


def token_mask_from_pixels(
    mask: torch.Tensor,
    *,
    factor: int,
    grid: Sequence[int],
    rule: str = "any",
    threshold: float = 0.5,
    grow: int = 0,
    image_size: Sequence[int] | None = None,
    channels: int = 1,
) -> torch.Tensor:
    """Reduce a pixel mask (True/1 = regenerate) to a token mask on a ``grid = (h, w)``.

    mask: ``[H, W]`` or ``[b, H, W]``, bool or float 0..1, of any size. Without ``image_size``
    it is resized to the token canvas ``(h*factor, w*factor)``; with ``image_size = (H, W)`` (the
    image the codec encoded, when the canvas was padded or cropped from it) it is resized to the
    image and then edge-extended / cropped to the canvas (:func:`fit_mask_to_grid`). Each token
    covers a ``factor × factor`` pixel cell; the token is regenerated when

    - ``rule="any"`` (default): any pixel of the cell is masked (value >= 0.5), so nothing the
      user painted survives — the usual inpainting rule;
    - ``rule="all"``: every pixel of the cell is masked (the official SUNDAE rule, stated from the
      kept side: a token is kept if any of its pixels is kept);
    - ``rule="coverage"``: the mean mask value over the cell is >= ``threshold`` (0 < t <= 1).

    Then the token mask is grown by ``grow`` tokens. ``channels > 1`` is for a pixel codec
    (factor 1) that interleaves its channels along the width (``w = W * channels``): the mask is
    reduced on the ``(h, w / channels)`` pixel grid, grown there, and each pixel's decision is
    repeated for its ``channels`` tokens. Returns bool ``[b, h, w]``.
    """
    if rule not in RULES:
        raise ValueError(f"token_mask_from_pixels: rule {rule!r} is not one of {list(RULES)}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(
            f"token_mask_from_pixels: threshold {threshold} must be in (0, 1] "
            "(the fraction of a token's pixels that must be masked)"
        )
    if int(factor) < 1:
        raise ValueError(f"token_mask_from_pixels: factor must be >= 1, got {factor}")
    if len(grid) != 2 or int(grid[0]) < 1 or int(grid[1]) < 1:
        raise ValueError(f"token_mask_from_pixels: grid must be (h, w) with both >= 1, got {tuple(grid)}")
    c = int(channels)
    if c < 1 or (c > 1 and (int(factor) != 1 or int(grid[1]) % c)):
        raise ValueError(
            f"token_mask_from_pixels: channels={channels} needs factor 1 and a grid width that is a "
            f"multiple of it (a pixel codec's interleaved channels), got factor {factor}, grid {tuple(grid)}"
        )
    f = int(factor)
    gh, gw = int(grid[0]), int(grid[1]) // c
    if image_size is not None:
        m = fit_mask_to_grid(mask, image_size=image_size, factor=f, grid=(gh, gw))
    else:
        m = resize_mask(mask, (gh * f, gw * f))
    cells = rearrange(m, "b (h fh) (w fw) -> b h w (fh fw)", fh=f, fw=f)
    if rule == "any":
        out = (cells >= PIXEL_ON).any(dim=-1)
    elif rule == "all":
        out = (cells >= PIXEL_ON).all(dim=-1)
    else:
        out = cells.mean(dim=-1) >= float(threshold) - 1e-6
    out = grow_token_mask(out, int(grow))
    return out if c == 1 else repeat(out, "b h w -> b h (w c)", c=c)


__all__ = ["RULES", "fit_mask_to_grid", "grow_token_mask", "resize_mask", "token_mask_from_pixels"]
