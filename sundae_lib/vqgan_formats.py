"""Source formats for ``vqgan_loading.load_vqgan``: diffusers ``VQModel`` key conversion and
``config.json`` mapping (which diffusers models a taming VQ-GAN can express, and which are
refused), and fetching ``hf://`` sources.

Key mapping diffusers -> taming: encoder ``down_blocks.i`` -> ``down.i``; decoder ``up_blocks.i``
-> ``up.{L-1-i}`` (diffusers lists decoder blocks in execution order, taming by level);
``resnets`` -> ``block``, ``attentions`` -> ``attn``, ``mid_block.{resnets.0, attentions.0,
resnets.1}`` -> ``mid.{block_1, attn_1, block_2}``, ``conv_norm_out`` -> ``norm_out``,
``conv_shortcut`` -> ``nin_shortcut``; attention ``group_norm``/``to_q``/``to_k``/``to_v``/
``to_out.0`` (or the older ``query``/``key``/``value``/``proj_attn``) -> ``norm``/``q``/``k``/
``v``/``proj_out`` with Linear ``[C, C]`` weights reshaped to 1x1 convs ``[C, C, 1, 1]``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._helpers import META_MODEL_TYPE, hf_download, parse_hf_source, read_safetensors_metadata
from .checks import is_int
from .vqgan_config import VQGANConfig

logger = logging.getLogger(__name__)

NOMINAL_RESOLUTION = 256  # taming's usual ddconfig.resolution; only its ratio to attention matters

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".th")
# diffusion_pytorch_model{,.fp16}.{safetensors,bin}, safetensors first
DIFFUSERS_WEIGHTS = tuple(f"diffusion_pytorch_model{variant}{ext}"
                          for ext in (".safetensors", ".bin") for variant in ("", ".fp16"))

_DIFFUSERS_ATTN = {
    "group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k",
    "to_v": "v", "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out",
}  # fmt: skip
_DIFFUSERS_BLOCK_RE = re.compile(
    r"^(?P<part>encoder|decoder)\.(?:(?P<side>down_blocks|up_blocks)\.(?P<i>\d+)\.)?"
    r"(?P<kind>resnets|attentions|downsamplers|upsamplers|mid_block\.resnets|mid_block\.attentions)"
    r"\.(?P<j>\d+)\.(?P<rest>.+)$"
)
_DIFFUSERS_PLAIN = {"conv_in", "conv_out", "conv_norm_out"}


def diffusers_to_taming(
    sd: Mapping[str, torch.Tensor], *, origin: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``VQModel`` state dict to taming keys (mapping in the module docstring):
    decoder ``up_blocks.i`` -> ``up.{L-1-i}``, ``conv_shortcut`` -> ``nin_shortcut``, attention
    ``to_q``/``query`` ... -> ``q`` ... with Linear ``[C, C]`` weights -> 1x1 conv ``[C, C, 1, 1]``.
    Unknown keys raise ``ValueError`` naming them."""
    num_up = 1 + max(
        (int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))),
        default=-1,
    )
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        new = _convert_diffusers_key(key, num_up)
        if new is None:
            unknown.append(key)
            continue
        if (
            new.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight"))
            and value.ndim == 2
        ):
            value = value[:, :, None, None]
        out[new] = value
    if unknown:
        raise ValueError(
            f"load_vqgan: {origin}: diffusers keys with no taming equivalent: {sorted(unknown)[:10]}; "
            "this is not a plain diffusers VQModel"
        )
    return out


def _convert_diffusers_key(key: str, num_up: int) -> str | None:
    if not key.startswith(("encoder.", "decoder.")):
        return key  # quant_conv, post_quant_conv, quantize.embedding.weight are unchanged
    part, _, rest = key.partition(".")
    head = rest.split(".", 1)[0]
    if head in _DIFFUSERS_PLAIN:
        return f"{part}.{rest.replace('conv_norm_out', 'norm_out', 1)}"
    m = _DIFFUSERS_BLOCK_RE.match(key)
    if m is None:
        return None
    kind, j, tail = m["kind"], int(m["j"]), m["rest"]
    if m["side"] is None:  # mid block
        if kind == "mid_block.resnets" and j in (0, 1):
            return _resnet_tail(f"{part}.mid.block_{j + 1}", tail)
        if kind == "mid_block.attentions" and j == 0:
            return _attn_tail(f"{part}.mid.attn_1", tail)
        return None
    i = int(m["i"])
    if (part, m["side"]) == ("encoder", "down_blocks"):
        base, resample = f"encoder.down.{i}", ("downsamplers", "downsample")
    elif (part, m["side"]) == ("decoder", "up_blocks") and i < num_up:
        base, resample = f"decoder.up.{num_up - 1 - i}", ("upsamplers", "upsample")
    else:
        return None
    if kind == "resnets":
        return _resnet_tail(f"{base}.block.{j}", tail)
    if kind == "attentions":
        return _attn_tail(f"{base}.attn.{j}", tail)
    if kind == resample[0] and j == 0 and tail.startswith("conv."):
        return f"{base}.{resample[1]}.{tail}"
    return None


def _resnet_tail(base: str, tail: str) -> str | None:
    name, _, param = tail.rpartition(".")
    name = {"conv_shortcut": "nin_shortcut"}.get(name, name)
    if name not in {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}:
        return None
    return f"{base}.{name}.{param}"


def _attn_tail(base: str, tail: str) -> str | None:
    name, _, param = tail.rpartition(".")
    new = _DIFFUSERS_ATTN.get(name)
    return None if new is None else f"{base}.{new}.{param}"


_DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
_SILU = ("silu", "swish")  # diffusers' get_activation maps both to nn.SiLU (taming's swish)


def _bad_field(cfg_path: Path, key: str, value: Any, want: str) -> ValueError:
    return ValueError(
        f"load_vqgan: {str(cfg_path)!r}: {key} must be {want}, got {value!r}; the diffusers "
        "VQModel config.json is damaged or hand-edited — fix that field or download it again"
    )


def _json_int(data: Mapping[str, Any], key: str, default: int, cfg_path: Path) -> int:
    value = data.get(key, default)
    if not is_int(value) or value < 1:
        raise _bad_field(cfg_path, key, value, "an integer >= 1")
    return value


def _json_bool(data: Mapping[str, Any], key: str, default: bool, cfg_path: Path) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _bad_field(cfg_path, key, value, "true or false")
    return value


def _json_list(
    data: Mapping[str, Any], key: str, default: list, cfg_path: Path, allowed: Any
) -> list:
    """A non-empty JSON list of integers >= 1 (``allowed is int``) or of names in ``allowed``."""
    value = data.get(key, default)
    if not isinstance(value, list | tuple) or not value:
        want = (
            "a non-empty list of integers >= 1"
            if allowed is int
            else f"a non-empty list of {sorted(allowed)}"
        )
        raise _bad_field(cfg_path, key, value, want)
    if allowed is int:
        if any(not is_int(v) or v < 1 for v in value):
            raise _bad_field(cfg_path, key, value, "a non-empty list of integers >= 1")
        return list(value)
    bad = [t for t in value if not isinstance(t, str) or t not in allowed]
    if bad:
        raise ValueError(
            f"load_vqgan: {str(cfg_path)!r}: {key} contains {bad}; only {sorted(allowed)} are "
            "taming-compatible, so this model cannot be loaded"
        )
    return list(value)


def check_diffusers_config(data: Any, cfg_path: Path) -> None:
    """Refuse everything but a taming-compatible ``VQModel`` config, naming the file and the
    field: another class, MoVQ's spatial norm, another activation, fields of the wrong type or
    range, and architectures a ``VQGANConfig`` cannot express (see ``fields_from_diffusers_config``)."""
    where = f"load_vqgan: {str(cfg_path)!r}"
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} is not a JSON object; expected a diffusers VQModel config.json")
    cls = data.get("_class_name")
    if cls != "VQModel":
        why = {
            "AutoencoderKL": "a KL autoencoder (continuous latents), not a VQ codec",
            "PaellaVQModel": "Würstchen's Paella VQ, a different architecture",
        }.get(str(cls), "not a diffusers VQModel")
        raise ValueError(
            f"{where}: _class_name is {cls!r}: {why}; load_vqgan reads VQModel folders only"
        )
    if data.get("norm_type", "group") != "group":
        raise ValueError(
            f"{where}: norm_type is {data.get('norm_type')!r}: this is a MoVQ model (spatially "
            "conditioned norms, e.g. Kandinsky's movq), not a taming-style VQ-GAN; only "
            "norm_type 'group' can be loaded"
        )
    if data.get("act_fn", "silu") not in _SILU:
        raise ValueError(
            f"{where}: act_fn is {data.get('act_fn')!r}; only 'silu' / 'swish' (taming's swish) "
            "is compatible, so this model cannot be loaded"
        )
    fields_from_diffusers_config(data, cfg_path)


def fields_from_diffusers_config(data: Mapping[str, Any], cfg_path: Path) -> dict[str, Any]:
    """``VQGANConfig`` fields from a diffusers ``config.json``, or a ``ValueError`` naming the file
    and the field that is of the wrong type or that a taming VQ-GAN cannot express."""
    where = f"load_vqgan: {str(cfg_path)!r}"
    boc = _json_list(data, "block_out_channels", [64], cfg_path, int)
    down = _json_list(data, "down_block_types", ["DownEncoderBlock2D"], cfg_path, _DOWN_TYPES)
    up = _json_list(data, "up_block_types", ["UpDecoderBlock2D"], cfg_path, _UP_TYPES)
    if not (len(boc) == len(down) == len(up)):
        raise ValueError(
            f"{where}: block_out_channels {boc} ({len(boc)} levels), down_block_types ({len(down)}) and "
            f"up_block_types ({len(up)}) must have equal lengths"
        )
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ValueError(
            f"{where}: block_out_channels {boc} are not all multiples of block_out_channels[0]={ch}; "
            "a taming VQ-GAN has widths ch*ch_mult with ch = block_out_channels[0] (ch_mult[0] = 1), "
            "so this model cannot be represented"
        )
    enc_attn = [i for i, t in enumerate(down) if _DOWN_TYPES[t]]
    dec_attn = sorted(len(up) - 1 - i for i, t in enumerate(up) if _UP_TYPES[t])
    if enc_attn != dec_attn:
        # taming (and VQGANConfig.attn_resolutions) puts attention per level on both sides
        raise ValueError(
            f"{where}: attention differs between down_block_types {down} (encoder levels {enc_attn}) "
            f"and up_block_types {up} (decoder levels {dec_attn}, up_block_types is listed from the "
            "lowest resolution); a taming VQ-GAN has attention at the same levels in encoder and "
            "decoder, so this model cannot be loaded"
        )
    groups = _json_int(data, "norm_num_groups", 32, cfg_path)
    if any(c % groups for c in boc):
        raise ValueError(
            f"{where}: norm_num_groups={groups} does not divide every width in block_out_channels "
            f"{boc}; GroupNorm needs that (diffusers could not build this model either)"
        )
    layers = _json_int(data, "layers_per_block", 1, cfg_path)
    z = _json_int(data, "latent_channels", 3, cfg_path)
    embed_dim = (
        z if data.get("vq_embed_dim") is None else _json_int(data, "vq_embed_dim", z, cfg_path)
    )
    in_channels = _json_int(data, "in_channels", 3, cfg_path)
    out_channels = _json_int(data, "out_channels", 3, cfg_path)
    n_embed = _json_int(data, "num_vq_embeddings", 256, cfg_path)
    mid_attention = _json_bool(data, "mid_block_add_attention", True, cfg_path)
    lookup = _json_bool(data, "lookup_from_codebook", False, cfg_path)
    upcast = _json_bool(data, "force_upcast", False, cfg_path)
    resolution = max(NOMINAL_RESOLUTION, 2 ** (len(boc) - 1))
    pixel_range = "0,1" if lookup and upcast else "-1,1"
    if pixel_range == "0,1":
        logger.info(
            "load_vqgan: %s looks like aMUSEd's VQ (lookup_from_codebook + force_upcast): pixel range 0..1",
            cfg_path,
        )
    fields = dict(
        ch=ch,
        ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=layers,
        attn_resolutions=tuple(resolution // 2**i for i in enc_attn),
        resolution=resolution,
        z_channels=z,
        in_channels=in_channels,
        out_ch=out_channels,
        dropout=0.0,
        double_z=False,
        embed_dim=embed_dim,
        n_embed=n_embed,
        norm_groups=groups,
        mid_attention=mid_attention,
        resamp_with_conv=True,
        pixel_range=pixel_range,
        quantizer="vq",
        remap_used=0,
    )
    try:  # limits (levels, blocks) live in VQGANConfig: report them against this file
        VQGANConfig(**fields)
    except ValueError as exc:
        names = ", ".join(f"{k} = {v}" for k, v in JSON_NAMES.items())
        raise ValueError(f"{where}: {exc} (config.json names: {names})") from exc
    return fields


JSON_NAMES = {
    "ch": "block_out_channels[0]", "ch_mult": "block_out_channels", "num_res_blocks": "layers_per_block",
    "attn_resolutions": "down_block_types/up_block_types", "z_channels": "latent_channels",
    "in_channels": "in_channels", "out_ch": "out_channels", "embed_dim": "vq_embed_dim",
    "n_embed": "num_vq_embeddings", "mid_attention": "mid_block_add_attention",
}  # fmt: skip


def find_vqmodel_folder(folder: Path) -> Path:
    """The folder holding the VQModel's config.json: ``folder`` or a pipeline's ``vqvae/``."""
    if (folder / "config.json").is_file():
        return folder
    if (folder / "vqvae" / "config.json").is_file():
        return folder / "vqvae"
    if (folder / "movq").is_dir():
        raise ValueError(
            f"load_vqgan: {str(folder)!r} is a pipeline whose image codec is MoVQ (movq/, Kandinsky): "
            "not a taming-style VQ-GAN; it cannot be loaded"
        )
    if any(folder.glob("*.msgpack")):
        raise ValueError(flax_message(next(iter(folder.glob("*.msgpack")))))
    listing = sorted(p.name for p in folder.iterdir())[:12]
    raise ValueError(
        f"load_vqgan: the folder {str(folder)!r} has no config.json (nor vqvae/config.json), so it is "
        f"not a diffusers VQModel folder (it holds {listing}); pass a weights file directly to infer "
        "the config from tensor shapes, or the folder that holds config.json"
    )


def flax_message(path: Path) -> str:
    return (
        f"load_vqgan: {str(path)!r} is a Flax msgpack checkpoint (e.g. dalle-mini's VQGAN), not a "
        "PyTorch format; convert it to PyTorch first (e.g. a diffusers/taming port) and load that"
    )


# --------------------------------------------------------------------------------------------
# hf:// sources
# --------------------------------------------------------------------------------------------


def fetch_hf(source: str) -> Path:
    """Download (or take from the cache) what ``source`` names; return the local file or folder."""
    repo_id, inner = parse_hf_source(source)
    if inner.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (".msgpack",)):
        path = hf_download(repo_id, inner, source=source)
        if path.suffix.lower() in PICKLE_SUFFIXES or (
            path.suffix.lower() in SAFETENSORS_SUFFIXES
            and META_MODEL_TYPE not in read_safetensors_metadata(path)
        ):
            _fetch_hf_yaml(repo_id, inner)
        return path
    sub = inner.strip("/")
    first_error: FileNotFoundError | None = None
    for folder in (sub, f"{sub}/vqvae".strip("/")):
        try:
            cfg_path = hf_download(repo_id, f"{folder}/config.json".lstrip("/"), source=source)
        except FileNotFoundError as exc:
            first_error = first_error or exc
            continue
        try:  # refuse MoVQ / AutoencoderKL / ... before downloading their weights
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None  # reported with its path by the folder loader
        if data is not None:
            check_diffusers_config(data, cfg_path)
        for name in DIFFUSERS_WEIGHTS:
            try:
                hf_download(repo_id, f"{folder}/{name}".lstrip("/"), source=source)
                return cfg_path.parent
            except FileNotFoundError:
                continue
        raise FileNotFoundError(
            f"load_vqgan: {source}: {repo_id}/{folder or '.'} has config.json but none of "
            f"{list(DIFFUSERS_WEIGHTS)} could be fetched (offline, or the weights are elsewhere)"
        )
    raise FileNotFoundError(
        f"load_vqgan: {source}: no diffusers config.json at {repo_id}/{sub or '(root)'} or its vqvae/ "
        "subfolder; name the subfolder or the weights file (hf://owner/repo/vqvae or "
        f"hf://owner/repo/path/model.ckpt). Cause: {first_error}"
    ) from first_error


def _fetch_hf_yaml(repo_id: str, inner: str) -> None:
    """Best effort: fetch a sibling yaml of a Hub checkpoint so the local cross-check sees it."""
    stem, _, _ = inner.rpartition(".")
    parent = inner.rpartition("/")[0]
    for name in (
        f"{stem}.yaml",
        f"{parent}/config.yaml".lstrip("/"),
        f"{parent}/model.yaml".lstrip("/"),
    ):
        try:
            hf_download(repo_id, name)
            return
        except FileNotFoundError:
            continue
