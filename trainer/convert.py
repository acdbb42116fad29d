"""``sundae-train convert``: re-save a native model file with its weights in another dtype (fp16
halves a shipped file), and re-point a prior at the VQ-GAN file it should be used with.

Loading always gives fp32 models (``load_vqgan`` / ``load_prior`` cast the stored weights), so a
half-precision file changes nothing for its users but its size and the rounding of its weights.
A prior records its VQ-GAN by sha256 (``sundae.codec``) and file name (``sundae.vqgan_file``);
converting the VQ-GAN changes its sha256, so ``--vqgan`` writes the converted file's into the
prior.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_RESERVED = ("sundae.model_type", "sundae.format_version", "sundae.config")


def convert_model(src: str, out: str, *, dtype: str = "fp16", vqgan: str | None = None) -> dict[str, Any]:
    """Write ``src`` (a native VQ-GAN or prior) to ``out`` with floating weights in ``dtype``.
    ``vqgan``: for a prior, the VQ-GAN file whose sha256 / factor / name it records from now on
    (its codebook size must match). Returns a summary (type, sizes, sha256, max weight change)."""
    from ..sundae_lib import load_prior, load_vqgan, save_prior, save_vqgan
    from ..sundae_lib._helpers import file_sha256, read_safetensors_metadata
    from ..sundae_lib.codec_spec import CodecSpec
    from ..sundae_lib.prior_metadata import META_VQGAN_SOURCE, PriorMetadata

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {list(DTYPES)}")
    src_path, out_path = Path(src), Path(out)
    if src_path.resolve() == out_path.resolve():
        raise ValueError(f"{out!r} is the source file; write the converted model to another path")
    meta = read_safetensors_metadata(src_path)
    kind = meta.get("sundae.model_type")
    extra = {k: v for k, v in meta.items() if k not in _RESERVED}
    if kind == "vqgan":
        if vqgan:
            raise ValueError("--vqgan applies to a prior; this file is a VQ-GAN")
        model = load_vqgan(str(src_path))
        extra = {k: v for k, v in extra.items() if k not in ("sundae.codebook_size", "sundae.downsample_factor")}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model = model.to(DTYPES[dtype])
        save_vqgan(model, out_path, extra_metadata=extra)
    elif kind == "sundae_prior":
        model = load_prior(str(src_path))
        if vqgan:
            codec = load_vqgan(vqgan)
            if int(codec.codebook_size) != int(model.codebook_size):
                raise ValueError(
                    f"the VQ-GAN {vqgan!r} has {codec.codebook_size} codes, the prior {src!r} "
                    f"{model.codebook_size}: give the VQ-GAN the prior was trained with"
                )
            spec = CodecSpec.of_codec(codec, sha256=file_sha256(vqgan), file=Path(vqgan).name)
            extra.pop(META_VQGAN_SOURCE, None)
            extra.update(PriorMetadata(codec=spec).to_metadata())  # sundae.codec + sundae.vqgan_file
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model = model.to(DTYPES[dtype])
        model.metadata = {}
        save_prior(model, out_path, metadata=extra)
    else:
        raise ValueError(
            f"{src!r} is not a native comfyui-sundae model (sundae.model_type = {kind!r}); convert "
            "takes files written by sundae-train or save_vqgan / save_prior"
        )
    after = {k: v.float() for k, v in model.state_dict().items()}
    change = max((float((after[k] - before[k].float()).abs().max()) for k in before if before[k].is_floating_point()), default=0.0)
    return {
        "type": kind, "dtype": dtype, "out": str(out_path),
        "bytes_in": src_path.stat().st_size, "bytes_out": out_path.stat().st_size,
        "sha256": file_sha256(out_path), "max_weight_change": change,
        "codec": extra.get("sundae.codec"),
    }
