"""Conversions between ComfyUI's tensors and the library's (no model maths here).

ComfyUI IMAGE: float ``[B, H, W, C]`` in 0..1, channels last (C = 3, sometimes 4).
Library images: float ``[b, c, H, W]`` in -1..1, c = the codec's ``in_channels`` (1 or 3).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat

from .types import CodecHandle


def image_to_codec(image: torch.Tensor, codec: CodecHandle, *, node: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """IMAGE ``[B, H, W, C]`` 0..1 -> codec input ``[B, c, H, W]`` in -1..1 on the codec's
    device and dtype, plus the original ``(H, W)``.

    Grey codecs take the mean of R, G, B; an alpha channel is dropped. Sizes that are not a
    multiple of the codec factor are left to the codec, which pads right/bottom by repeating the
    edge (``VQGAN.encode``); Decode crops back to the returned ``(H, W)``."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(
            f"{node}: expected an IMAGE [B, H, W, C], got {tuple(getattr(image, 'shape', ()))}"
        )
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{node}: IMAGE has {image.shape[-1]} channels; expected 1, 3 or 4 (RGB[A])")
    if min(image.shape[:3]) == 0:
        raise ValueError(
            f"{node}: the IMAGE is empty (shape [B, H, W, C] = {list(image.shape)}); it needs at least "
            "one image of at least 1x1 pixels — check the node that feeds it (e.g. a batch filter "
            "that matched nothing)"
        )
    rgb = image[..., :3].float()
    if rgb.shape[-1] == 1:
        rgb = repeat(rgb, "b h w 1 -> b h w c", c=3)
    x = rearrange(rgb, "b h w c -> b c h w") * 2.0 - 1.0
    if codec.in_channels == 1:
        x = x.mean(dim=1, keepdim=True)
    elif codec.in_channels != 3:
        raise ValueError(f"{node}: codec {codec.name!r} takes {codec.in_channels} channels; only 1 (grey) or 3 (RGB) are supported")
    size = (int(x.shape[-2]), int(x.shape[-1]))
    return x.to(device=codec.device, dtype=codec.dtype), size


def codec_to_image(x: torch.Tensor, size: tuple[int, int], *, device: torch.device) -> torch.Tensor:
    """Codec output ``[B, c, H', W']`` in -1..1 -> IMAGE ``[B, H, W, 3]`` float32 0..1 on
    ``device``, cropped to ``size``; grey is repeated to three channels."""
    x = x[..., : size[0], : size[1]].float()
    if x.shape[1] == 1:
        x = repeat(x, "b 1 h w -> b c h w", c=3)
    img = rearrange((x + 1.0) * 0.5, "b c h w -> b h w c").clamp(0.0, 1.0)
    return img.to(device)


def image_to_pil(image: torch.Tensor):
    """One IMAGE ``[H, W, 3]`` 0..1 -> a PIL RGB image (for progress previews)."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr, mode="RGB") if arr.shape[-1] == 3 else Image.fromarray(arr[..., 0], mode="L")


def tokens_on(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tokens.to(device=device, dtype=torch.long)
