"""``load_vqgan``: read VQ-GANs from every format we know into our native taming-layout ``VQGAN``.
This module finds and reads the files; what their tensors say (VQ families kept, foreign models
refused, config inferred) is ``vqgan_state_dict.py``, diffusers keys and configs and ``hf://``
fetching are ``vqgan_formats.py``.

Sources, in the order they are detected:

1. a native ``.safetensors`` (metadata ``sundae.model_type``) -> ``load_vqgan_native``;
2. a folder (or ``hf://owner/repo[/subfolder]``) with a diffusers ``config.json``: ``VQModel`` only
   (``norm_type: group``, ``act_fn: silu``); a pipeline root with a ``vqvae/`` subfolder works too;
   weights ``diffusion_pytorch_model[.fp16].safetensors`` or legacy ``.bin``;
3. a taming-transformers / latent-diffusion ``.ckpt`` / ``.pth`` (weights-only unpickling with
   inert stand-ins, ``safe_pickle.py``) or ``.safetensors`` without sundae metadata: unwrap
   ``state_dict`` (Lightning) / ``model`` (VQ-Diffusion), keep ``first_stage_model.*`` of combined
   models, keep ``encoder./decoder./quantize./quant_conv./post_quant_conv.`` and drop the other
   families (loss, EMA, transformer, ...); diffusers-layout keys are converted
   (``vqgan_formats.diffusers_to_taming``);
4. the config is ``config=``, else inferred exactly from tensor shapes
   (``vqgan_state_dict.infer_vqgan_config``); a sibling taming / LDM yaml, when present and
   PyYAML is importable, must agree with the weights.

``config=``: a ``VQGANConfig`` is used verbatim; a dict *overrides* fields of the detected config
(e.g. ``{"pixel_range": "-1,1"}`` or ``{"norm_groups": 8}``), unknown keys are an error.

Heuristic (diffusers): ``pixel_range`` is ``"0,1"`` when ``config.json`` has both
``lookup_from_codebook`` and ``force_upcast`` true -- the signature of aMUSEd's VQ (and its
copies such as Meissonic's), whose pipelines feed images in [0, 1]; everything else is [-1, 1].

Loading never unpickles code: safetensors, or ``torch.load(weights_only=True)`` with a scoped
allow-list of inert stand-ins. Loading is strict within the kept families.

Memory: every path first runs on the tensors' *declared* shapes (a safetensors header, or a zip
checkpoint unpickled onto the meta device) and builds the model on the meta device, so a file
whose config disagrees with its tensors, or that describes an absurd model, is refused before any
weight is read, inflated or allocated. Only then are the tensors read and the model built.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._helpers import (
    META_MODEL_TYPE,
    check_weights_fit,
    is_hf_source,
    load_safetensors,
    load_state_dict_strict,
    read_safetensors_metadata,
    read_safetensors_shapes,
    resolve_shipped,
    safetensors_dtype,
)
from .safe_pickle import is_zip_checkpoint, safe_torch_load
from .vqgan import VQGAN, load_vqgan_native
from .vqgan_config import VQGANConfig
from .vqgan_formats import (
    DIFFUSERS_WEIGHTS,
    JSON_NAMES,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    check_diffusers_config,
    diffusers_to_taming,
    fetch_hf,
    fields_from_diffusers_config,
    find_vqmodel_folder,
    flax_message,
)
from .vqgan_state_dict import (
    FORMATS,
    infer_vqgan_config,
    normalize_quantizer,
    refuse_foreign,
    select_vq_tensors,
    unwrap_container,
)
from .vqgan_state_dict import logger as _state_dict_logger

__all__ = ["load_vqgan", "diffusers_to_taming", "infer_vqgan_config"]

logger = logging.getLogger(__name__)

# True while a load runs on declared shapes only (meta tensors): _build checks and returns None
_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("sundae_vqgan_shapes_only", default=False)


class _QuietWhileCheckingShapes(logging.Filter):
    """The shape-only pass repeats what the real pass logs; keep the log to one copy."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _SHAPES_ONLY.get()


logger.addFilter(_QuietWhileCheckingShapes())
_state_dict_logger.addFilter(_QuietWhileCheckingShapes())

TAMING_NORM_GROUPS = 32


def load_vqgan(
    source: str | os.PathLike, *, config: VQGANConfig | Mapping[str, Any] | None = None
) -> VQGAN:
    """Load a VQ-GAN from any supported source (module docstring) as a native ``VQGAN`` in eval
    mode on the CPU (fp32). ``encode(x [b, c, H, W] in [-1, 1]) -> tokens [b, h, w]`` then gives
    the same ids as the original implementation (taming / diffusers).

    Raises ``FileNotFoundError`` for a missing path or an uncached ``hf://`` file offline, and
    ``ValueError`` naming the file, the detected format and what to do for anything unloadable
    (unknown type, truncated file, foreign architecture, unsafe pickle, config mismatch)."""
    if config is not None and not isinstance(config, VQGANConfig | Mapping):
        raise ValueError(
            f"load_vqgan: config must be a VQGANConfig, a dict of field overrides or None, got "
            f"{type(config).__name__}"
        )
    source = resolve_shipped(source, "vqgan")
    if isinstance(source, str) and is_hf_source(source):
        path = fetch_hf(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"load_vqgan: {str(path)!r} does not exist; expected {FORMATS}"
            )
    return _load_path(path, config).eval()


def _load_path(path: Path, config: Any) -> VQGAN:
    if path.is_dir():
        return _load_diffusers_folder(path, config)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        if META_MODEL_TYPE in read_safetensors_metadata(path):
            return _load_native(path, config)
        fmt = "safetensors without sundae metadata"
        _check_shapes_first(lambda sd: _from_state_dict(sd, path, config, fmt=fmt), _header_tensors(path))
        return _from_state_dict(load_safetensors(path), path, config, fmt=fmt)
    if suffix in PICKLE_SUFFIXES:
        fmt = f"PyTorch {suffix} checkpoint"
        if is_zip_checkpoint(path):  # the pickle alone gives every shape: check before inflating records
            meta = safe_torch_load(path, what="load_vqgan", map_location="meta")
            _check_shapes_first(lambda sd: _from_state_dict(sd, path, config, fmt=fmt), unwrap_container(meta, path))
        obj = safe_torch_load(path, what="load_vqgan")
        return _from_state_dict(unwrap_container(obj, path), path, config, fmt=fmt)
    if suffix == ".msgpack":
        raise ValueError(flax_message(path))
    if suffix in (".yaml", ".yml", ".json"):
        raise ValueError(
            f"load_vqgan: {str(path)!r} is a config file, not weights; pass the weights file (its "
            "config is read from a sibling yaml) or, for diffusers, the folder holding config.json"
        )
    if suffix == ".zip":
        raise ValueError(
            f"load_vqgan: {str(path)!r} is a zip archive (latent-diffusion downloads are zips of "
            "model.ckpt + config.yaml); unzip it and pass model.ckpt"
        )
    raise ValueError(
        f"load_vqgan: unknown file type {suffix or '(no extension)'!r} for {str(path)!r}; expected "
        f"{FORMATS} (extensions {list(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)})"
    )


# --------------------------------------------------------------------------------------------
# config resolution
# --------------------------------------------------------------------------------------------


def _resolve_config(user: Any, fields: dict[str, Any], origin: str) -> VQGANConfig:
    """The final config: ``user`` verbatim if a VQGANConfig, else ``fields`` updated with the
    user's overrides. ``norm_groups=None`` (unknown: not stored in weights) becomes taming's 32
    when every width allows it."""
    if isinstance(user, VQGANConfig):
        return user
    fields = {**fields, **dict(user or {})}
    if fields.get("norm_groups") is None:
        widths = sorted({fields["ch"] * m for m in fields["ch_mult"]} | {fields["ch"]})
        if any(w % TAMING_NORM_GROUPS for w in widths):
            raise ValueError(
                f"load_vqgan: {origin}: the GroupNorm group count is not stored in the weights; "
                f"taming uses {TAMING_NORM_GROUPS} but the widths {widths} are not all divisible by "
                f"it — pass config={{'norm_groups': N}} with the value the model was trained with"
            )
        fields["norm_groups"] = TAMING_NORM_GROUPS
    return VQGANConfig.from_dict(fields)


def _build(config: VQGANConfig, state_dict: Mapping[str, torch.Tensor], origin: str) -> VQGAN | None:
    """The model with ``state_dict`` loaded strictly; config and shapes are checked on the meta
    device first (nothing allocated when they disagree). In the shape-only pass: None."""
    what = f"load_vqgan: {origin}"
    check_weights_fit(lambda: VQGAN(config), state_dict, what=what)
    if _SHAPES_ONLY.get():
        return None
    model = VQGAN(config)
    load_state_dict_strict(model, state_dict, what=what)
    return model


def _header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Meta tensors with the shapes and dtypes a ``.safetensors`` header declares (no data read)."""
    return {
        k: torch.empty(shape, dtype=safetensors_dtype(dtype), device="meta")
        for k, (shape, dtype) in read_safetensors_shapes(path).items()
    }


def _check_shapes_first(load: Callable[[Mapping[str, Any]], Any], declared: Mapping[str, Any]) -> None:
    """Run a load on the declared (meta) tensors: every check, config inference and the meta
    build happen, nothing is allocated; a problem raises the same error the real load would."""
    token = _SHAPES_ONLY.set(True)
    try:
        load(declared)
    finally:
        _SHAPES_ONLY.reset(token)


def _load_native(path: Path, config: Any) -> VQGAN:
    model = load_vqgan_native(path)
    if config is None:
        return model
    final = _resolve_config(config, model.config.to_dict(), str(path))
    if final == model.config:
        return model
    logger.info("load_vqgan: %s: config overridden by config=: %s", path.name, final)
    return _build(final, model.state_dict(), f"{str(path)!r} with config={config!r}")


# --------------------------------------------------------------------------------------------
# taming / LDM checkpoints (+ sibling yaml)
# --------------------------------------------------------------------------------------------


def _vq_tensors(sd: Mapping[str, Any], origin: str, fmt: str, *, remedy: str) -> dict[str, Any]:
    """The VQ-GAN tensors of a loaded state dict (``select_vq_tensors``), after refusing an empty
    file (``remedy`` says what to do) and foreign architectures (``refuse_foreign``)."""
    if not sd:
        raise ValueError(f"load_vqgan: {origin} ({fmt}) is empty: it holds no tensors; {remedy}")
    sd = select_vq_tensors(sd, origin, fmt)
    refuse_foreign(sd, origin, fmt)
    return sd


def _from_state_dict(sd: Mapping[str, Any], path: Path, config: Any, *, fmt: str) -> VQGAN:
    origin = repr(str(path))
    sd = _vq_tensors(sd, origin, fmt, remedy="download or export it again")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        fmt = f"{fmt}, diffusers key layout"
        sd = diffusers_to_taming(sd, origin=origin)
    elif not any(k.startswith("encoder.down.") for k in sd):
        raise ValueError(
            f"load_vqgan: {origin} ({fmt}): unrecognised key layout (neither taming encoder.down.* "
            f"nor diffusers encoder.down_blocks.*; first keys {sorted(sd)[:6]})"
        )
    sd = normalize_quantizer(dict(sd), origin)
    if isinstance(config, VQGANConfig):
        return _build(config, sd, f"{origin} ({fmt})")
    fields = infer_vqgan_config(sd, origin=f"{origin} ({fmt})")
    fields = _cross_check_yaml(path, fields, origin)
    return _build(_resolve_config(config, fields, origin), sd, f"{origin} ({fmt})")


def _yaml_candidates(path: Path) -> list[Path]:
    return [
        path.with_suffix(".yaml"),
        path.with_suffix(".yml"),
        path.parent / "config.yaml",
        path.parent / "model.yaml",
        path.parent / "configs" / "model.yaml",
        path.parent.parent / "configs" / "model.yaml",
    ]


def _find_vq_params(doc: Any) -> tuple[dict, str, str] | None:
    """(params, target, dotted path of params) of the VQ model in a taming / LDM yaml."""
    if not isinstance(doc, Mapping):
        return None
    model, where = (doc["model"], "model") if isinstance(doc.get("model"), Mapping) else (doc, "")
    params = model.get("params") if isinstance(model.get("params"), Mapping) else {}
    target, where = str(model.get("target", "")), f"{where}.params".lstrip(".")
    first = params.get("first_stage_config")
    if isinstance(first, Mapping):  # Net2Net / latent diffusion bundle
        target, params, where = (
            str(first.get("target", "")),
            first.get("params") or {},
            f"{where}.first_stage_config.params",
        )
    if not isinstance(params, Mapping) or not isinstance(params.get("ddconfig"), Mapping):
        return None
    return dict(params), target, where


def _cross_check_yaml(path: Path, fields: dict[str, Any], origin: str) -> dict[str, Any]:
    """Compare a sibling yaml with the inferred fields; adopt its nominal resolution/dropout."""
    found = next((p for p in _yaml_candidates(path) if p.is_file()), None)
    if found is None:
        return fields
    try:
        import yaml
    except ImportError:
        logger.info("load_vqgan: PyYAML is not installed; not cross-checking %s", found)
        return fields
    try:
        doc = yaml.safe_load(found.read_text(encoding="utf-8"))
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError
        raise ValueError(
            f"load_vqgan: the config {str(found)!r} next to {origin} is not valid YAML ({exc}); fix or remove it"
        ) from exc
    located = _find_vq_params(doc)
    if located is None:
        logger.warning("load_vqgan: %s has no VQ model ddconfig; ignoring it", found)
        return fields
    params, target, where = located
    dd = params["ddconfig"]
    attn_type = str(dd.get("attn_type", "vanilla"))
    if attn_type == "linear":
        raise ValueError(
            f"load_vqgan: {str(found)!r} sets attn_type: linear (latent-diffusion linear attention), which cannot be loaded"
        )
    expected: dict[str, tuple[str, Any]] = {}  # field -> (yaml path, value)
    for name in ("ch", "num_res_blocks", "z_channels", "in_channels", "out_ch", "double_z"):
        if name in dd:
            expected[name] = (f"{where}.ddconfig.{name}", dd[name])
    if "ch_mult" in dd:
        expected["ch_mult"] = (f"{where}.ddconfig.ch_mult", tuple(dd["ch_mult"]))
    for name in ("embed_dim", "n_embed"):
        if name in params:
            expected[name] = (f"{where}.{name}", params[name])
    expected["mid_attention"] = (f"{where}.ddconfig.attn_type", attn_type != "none")
    if target:
        expected["quantizer"] = (
            f"{where.removesuffix('.params')}.target",
            "gumbel" if "Gumbel" in target else "vq",
        )
    has_remap = params.get("remap") is not None
    if has_remap != (fields["remap_used"] > 0):
        raise ValueError(
            f"load_vqgan: {str(found)!r}: field '{where}.remap' is {params.get('remap')!r} but the weights "
            f"in {origin} {'have' if fields['remap_used'] else 'have no'} a quantize.used remap buffer; "
            "the yaml does not belong to these weights — fix or remove it, or pass config="
        )
    resolution = dd.get("resolution")
    yaml_attn = None
    if isinstance(resolution, int) and resolution > 0 and "attn_resolutions" in dd:
        attn = tuple(int(r) for r in dd["attn_resolutions"] or ())
        yaml_attn = attn
        ours = [
            i
            for i in range(len(fields["ch_mult"]))
            if fields["resolution"] // 2**i in fields["attn_resolutions"]
        ]
        theirs = [i for i in range(len(fields["ch_mult"])) if resolution // 2**i in attn]
        if ours != theirs:
            raise ValueError(
                f"load_vqgan: {str(found)!r}: field '{where}.ddconfig.attn_resolutions' = {list(attn)} at "
                f"resolution {resolution} puts attention at levels {theirs}, but the weights in {origin} "
                f"have attention at levels {ours}; the yaml does not belong to these weights — fix or remove it"
            )
    for name, (yaml_path, value) in expected.items():
        if value != fields[name]:
            raise ValueError(
                f"load_vqgan: {str(found)!r}: field '{yaml_path}' is {value!r} but the weights in {origin} "
                f"give {fields[name]!r}; the yaml does not belong to these weights — fix or remove it, "
                "or pass config= explicitly"
            )
    logger.info("load_vqgan: %s agrees with the weights", found)
    fields = dict(fields)
    f = 2 ** (len(fields["ch_mult"]) - 1)
    if yaml_attn is not None and resolution % f == 0:
        sizes = {resolution // 2**i for i in range(len(fields["ch_mult"]))}
        fields["resolution"] = resolution
        fields["attn_resolutions"] = tuple(r for r in yaml_attn if r in sizes)
    if isinstance(dd.get("dropout"), int | float) and 0 <= dd["dropout"] < 1:
        fields["dropout"] = float(dd["dropout"])
    return fields


# --------------------------------------------------------------------------------------------
# diffusers folders
# --------------------------------------------------------------------------------------------


def _load_diffusers_folder(folder: Path, config: Any) -> VQGAN:
    folder = find_vqmodel_folder(folder)
    cfg_path = folder / "config.json"
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"load_vqgan: {str(cfg_path)!r} is not valid JSON ({exc}); download it again"
        ) from exc
    check_diffusers_config(data, cfg_path)
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        if (folder / "diffusion_flax_model.msgpack").is_file():
            raise ValueError(flax_message(folder / "diffusion_flax_model.msgpack"))
        raise ValueError(
            f"load_vqgan: the diffusers folder {str(folder)!r} has config.json but no weights; expected "
            f"one of {list(DIFFUSERS_WEIGHTS)} — download the weights too"
        )
    fmt = f"diffusers VQModel {weights.name}"
    if weights.suffix == ".safetensors":
        shapes = _header_tensors(weights)
    elif is_zip_checkpoint(weights):
        shapes = unwrap_container(safe_torch_load(weights, map_location="meta"), weights)
    else:  # legacy pickle: its storages are bounded by the file size (safe_torch_load)
        shapes = None
    if shapes is not None:
        _check_shapes_first(lambda sd: _diffusers_from_state_dict(sd, weights, data, cfg_path, config, fmt), shapes)
    sd = (
        load_safetensors(weights)
        if weights.suffix == ".safetensors"
        else unwrap_container(safe_torch_load(weights), weights)
    )
    return _diffusers_from_state_dict(sd, weights, data, cfg_path, config, fmt)


def _diffusers_from_state_dict(sd, weights: Path, data: dict, cfg_path: Path, config: Any, fmt: str) -> VQGAN | None:
    origin = repr(str(weights))
    sd = _vq_tensors(sd, origin, fmt, remedy="download it again")
    sd = normalize_quantizer(diffusers_to_taming(sd, origin=origin), origin)
    declared = fields_from_diffusers_config(data, cfg_path)
    if isinstance(config, VQGANConfig):
        return _build(config, sd, f"{origin} ({fmt})")
    inferred = infer_vqgan_config(sd, origin=f"{origin} ({fmt})")
    for name, json_name in JSON_NAMES.items():
        if declared[name] != inferred[name]:
            raise ValueError(
                f"load_vqgan: {str(cfg_path)!r}: {json_name} gives {name}={declared[name]!r} but the "
                f"weights in {origin} have {inferred[name]!r}; config.json and weights do not belong together"
            )
    return _build(_resolve_config(config, declared, origin), sd, f"{origin} ({fmt})")
