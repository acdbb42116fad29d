"""sundae_lib: SUNDAE priors over VQ-GAN tokens — models, losses, sampler, checkpoint I/O.

Imports torch, einops, safetensors and numpy only; never ComfyUI, click or a launcher.
Public names are resolved lazily so that ``import sundae_lib`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> defining submodule (the contract in docs/design.md "Public library API"; add
# freely, rename nothing)
_EXPORTS = {
    # prior
    "PriorConfig": "prior",
    "SundaePrior": "prior",
    "save_prior": "prior",
    "load_prior": "prior",
    # objective and sampler
    "sundae_loss": "loss",
    "corrupt_tokens": "noise",
    "sample": "sampler",
    "interrupt_check": "layers",
    "compile_prior": "compiled",
    # codecs
    "VQGANConfig": "vqgan_config",
    "VQGAN": "vqgan",
    "PixelCodec": "vqgan",
    "save_vqgan": "vqgan",
    "load_vqgan": "vqgan_loading",
    # the codec a prior records, and whether a codec fits it
    "CodecSpec": "codec_spec",
    "check_codec_pairing": "codec_spec",
    # what a prior file records: sampler defaults, class names; resolving a class
    "SamplingDefaults": "prior_metadata",
    "PriorMetadata": "prior_metadata",
    "resolve_class": "labels",
    # inpainting masks
    "token_mask_from_pixels": "masks",
    "resize_mask": "masks",
    # precision: what "auto" means everywhere
    "preferred_dtype": "dtypes",
    "cpu_bf16_report": "dtypes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
