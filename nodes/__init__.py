"""ComfyUI nodes of comfyui-sundae (classic V1 API).

Each node converts ComfyUI values, makes one ``sundae_lib`` call and converts back; ComfyUI's
services are reached only through :mod:`.comfy_adapter`. Importing this package registers the
``vqgan`` and ``sundae`` model folders (keeping the user's ``extra_model_paths.yaml`` entries).
"""

from __future__ import annotations

from . import comfy_adapter
from .codec_nodes import SundaeDecode, SundaeEncode
from .loaders import SundaeLoadPrior, SundaeLoadVQGAN
from .mask_node import SundaeLatentMask
from .sampler_node import SundaeSampler
from .types import CodecHandle, PriorHandle, TokenBatch

comfy_adapter.register_model_folders()

NODE_CLASS_MAPPINGS = {
    "SundaeLoadVQGAN": SundaeLoadVQGAN,
    "SundaeLoadPrior": SundaeLoadPrior,
    "SundaeEncode": SundaeEncode,
    "SundaeLatentMask": SundaeLatentMask,
    "SundaeSampler": SundaeSampler,
    "SundaeDecode": SundaeDecode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SundaeLoadVQGAN": "Load VQ-GAN",
    "SundaeLoadPrior": "Load SUNDAE Prior",
    "SundaeEncode": "VQ-GAN Encode",
    "SundaeLatentMask": "Latent Mask",
    "SundaeSampler": "SUNDAE Sampler",
    "SundaeDecode": "VQ-GAN Decode",
}

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "CodecHandle",
    "PriorHandle",
    "TokenBatch",
]
