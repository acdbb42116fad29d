"""Load VQ-GAN and Load SUNDAE Prior.

Files come from the ``vqgan`` and ``sundae`` model folders (``models/vqgan``, ``models/sundae``,
``extra_model_paths.yaml`` entries, and the pack's ``shipped_models/``). Load VQ-GAN also offers
pixel "codecs" (identity, factor 1) for pixel-level priors, as entries named
``pixels (<levels> levels, grey)`` after the files. Loaded models are placed on ComfyUI's device
once and shared by every consumer: nothing downstream may move or modify them.
"""

from __future__ import annotations

import logging
import re

from .. import sundae_lib
from ..sundae_lib.codec_spec import META_CODEC, CodecSpec
from ..sundae_lib.prior_metadata import metadata_of
from . import comfy_adapter as comfy
from .types import PRIOR_TYPE, VQGAN_TYPE, CodecHandle, PriorHandle

logger = logging.getLogger(__name__)

PIXEL_LEVELS = (256, 128, 64, 32, 16, 8, 4, 2)
_PIXEL_RE = re.compile(r"^pixels \((\d+) levels, (grey|RGB)\)$")
_COMPILE_TOOLTIP = (
    "torch.compile the prior (inductor, frozen weights): faster sampling steps, but the first run "
    "of each new image size compiles for tens of seconds (progress waits at the first step). Worth "
    "it for many images with one model; needs a C++ compiler on CPUs; off for the small shipped models."
)
_DTYPE_TOOLTIP = (
    "Weights precision: auto = the fastest safe one here (bf16 on GPUs that have it, else fp16; on CPU "
    "bf16 only with AMX / AVX512-BF16 measured faster, else fp32); bf16/fp16 halve the memory, fp32 "
    "is the most exact."
)


def pixel_codec_entry(levels: int, channels: int = 1) -> str:
    return f"pixels ({levels} levels, {'grey' if channels == 1 else 'RGB'})"


PIXEL_ENTRIES = tuple(pixel_codec_entry(n) for n in PIXEL_LEVELS)


def parse_pixel_codec_entry(entry: str) -> tuple[int, int] | None:
    """``"pixels (16 levels, grey)"`` -> ``(16, 1)``; a model file name -> None."""
    m = _PIXEL_RE.match(entry)
    if m is None:
        return None
    return int(m.group(1)), 1 if m.group(2) == "grey" else 3


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def _place(model, dtype_choice: str):
    """Move a freshly loaded model to ComfyUI's device in the chosen dtype, frozen for inference."""
    device = comfy.torch_device()
    dtype = comfy.pick_dtype(dtype_choice, device)
    comfy.free_memory(_model_bytes(model), device)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, device, dtype


def _signature(folder: str, entry: str) -> str:
    try:
        return comfy.file_signature(comfy.resolve_model_path(folder, entry))
    except (FileNotFoundError, OSError):
        return f"missing:{entry}"  # load() raises the explanatory error


class SundaeLoadVQGAN:
    DESCRIPTION = (
        "Loads a VQ-GAN (native .safetensors, taming / latent-diffusion checkpoint, or a diffusers "
        "VQModel folder) from models/vqgan, or a pixel codec for priors trained on raw pixels. "
        "The codec turns images into tokens and tokens back into images."
    )
    CATEGORY = "sundae/loaders"
    RETURN_TYPES = (VQGAN_TYPE,)
    RETURN_NAMES = ("vqgan",)
    OUTPUT_TOOLTIPS = ("The codec (VQ-GAN or pixel codec), for Encode, Decode and Sampler previews.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = comfy.list_model_files("vqgan", diffusers_vqmodels=True)
        return {
            "required": {
                "vqgan_name": (
                    files + list(PIXEL_ENTRIES),
                    {
                        "tooltip": "The VQ-GAN file from models/vqgan (folders ending in '/' are "
                        "diffusers VQModels), or a 'pixels (N levels)' codec for pixel-level "
                        "priors: more levels keep finer grey shades."
                    },
                ),
                "dtype": (list(comfy.DTYPE_CHOICES), {"default": "auto", "tooltip": _DTYPE_TOOLTIP}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, vqgan_name, dtype="auto"):
        if parse_pixel_codec_entry(vqgan_name) is not None:
            return f"{vqgan_name}:{dtype}"
        return f"{_signature('vqgan', vqgan_name)}:{dtype}"

    def load(self, vqgan_name: str, dtype: str = "auto"):
        pixel = parse_pixel_codec_entry(vqgan_name)
        if pixel is not None:
            model = sundae_lib.PixelCodec(levels=pixel[0], channels=pixel[1])
            dtype = "fp32"  # no weights to halve; half precision would misround grey levels
        else:
            path = comfy.resolve_model_path("vqgan", vqgan_name)
            model = sundae_lib.load_vqgan(str(path))
        model, device, dt = _place(model, dtype)
        handle = CodecHandle(model=model, name=vqgan_name, device=device, dtype=dt,
                             source=None if pixel is not None else str(path))
        logger.info("SundaeLoadVQGAN: loaded %s on %s (%s)", handle.codec_id, device, dt)
        return (handle,)


def factor_from_codec_metadata(codec: str | None) -> int | None:
    """The codec factor told by a prior's ``sundae.codec`` metadata: ``pixel:...`` -> 1,
    ``vqgan:...,factor=4`` -> 4, unknown or malformed -> None."""
    if not codec:
        return None
    try:
        factor = CodecSpec.parse(codec).factor
    except ValueError as exc:
        logger.warning("SundaeLoadPrior: unreadable codec metadata (%s); the codec factor is unknown", exc)
        return None
    if factor is not None and factor < 1:
        logger.warning(
            "the prior's 'sundae.codec' metadata %r gives factor=%d, but a codec factor is >= 1; "
            "ignoring it (connect the VQ-GAN to the sampler to size images in pixels)", codec, factor,
        )
        return None
    return factor


class SundaeLoadPrior:
    DESCRIPTION = (
        "Loads a SUNDAE prior (a native .safetensors file) from models/sundae. The prior predicts "
        "tokens of the VQ-GAN it was trained on; pair it with that VQ-GAN."
    )
    CATEGORY = "sundae/loaders"
    RETURN_TYPES = (PRIOR_TYPE,)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The SUNDAE prior, for the SUNDAE Sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prior_name": (
                    comfy.list_model_files("sundae"),
                    {"tooltip": "The SUNDAE prior file from models/sundae (larger priors give better images but sample more slowly)."},
                ),
                "dtype": (list(comfy.DTYPE_CHOICES), {"default": "auto", "tooltip": _DTYPE_TOOLTIP}),
            },
            "optional": {
                "torch_compile": ("BOOLEAN", {"default": False, "tooltip": _COMPILE_TOOLTIP}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, prior_name, dtype="auto", torch_compile=False):
        return f"{_signature('sundae', prior_name)}:{dtype}:{bool(torch_compile)}"

    def load(self, prior_name: str, dtype: str = "auto", torch_compile: bool = False):
        path = comfy.resolve_model_path("sundae", prior_name)
        model = sundae_lib.load_prior(str(path))
        codec = metadata_of(model).get(META_CODEC)  # the raw string, for messages; parsed by CodecSpec
        model, device, dt = _place(model, dtype)
        if torch_compile:  # after placing: the frozen weights are this device's and dtype's
            model = sundae_lib.compile_prior(model)
        handle = PriorHandle(
            model=model, name=prior_name, device=device, dtype=dt, codec=codec,
            factor=factor_from_codec_metadata(codec),
        )
        logger.info(
            "SundaeLoadPrior: loaded %s (%d codes, %s classes, trained grid %s, codec %s) on %s (%s%s)",
            prior_name, handle.codebook_size, model.num_classes or "no", tuple(model.config.grid),
            codec or "unknown", device, dt, ", torch.compile: compiles at the first step" if torch_compile else "",
        )
        return (handle,)
