"""VQGANConfig: every preset builds the taming layout (checked against shapes read
independently of the model code), preset values and overrides, JSON round trip and validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from comfyui_sundae.sundae_lib import _helpers
from comfyui_sundae.sundae_lib.vqgan import VQGAN
from comfyui_sundae.sundae_lib.vqgan_config import VQGANConfig

TINY = VQGANConfig.preset("tiny")


def _infer_from_shapes(sd: dict[str, torch.Tensor]) -> dict:
    """The ddconfig from tensor shapes (what ``vqgan_state_dict.infer_vqgan_config`` infers for
    a checkpoint without a config), written independently of the model code."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    return dict(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        ch=ch,
        ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels),
        num_res_blocks=len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}),
        z_channels=sd["decoder.conv_in.weight"].shape[1],
        out_ch=sd["decoder.conv_out.weight"].shape[0],
        embed_dim=sd["quant_conv.weight"].shape[0],
        n_embed=sd["quantize.embedding.weight"].shape[0],
        attn_levels=tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd),
        mid_attention="encoder.mid.attn_1.q.weight" in sd,
    )


@pytest.mark.parametrize(
    "name, factor, attn_levels",
    [
        ("taming-f16-1024", 16, (4,)),
        ("ldm-vq-f4", 4, ()),
        ("ldm-vq-f8", 8, (3,)),
        ("ldm-vq-f16", 16, (4,)),
        ("ffhq1024-f32", 32, (4,)),
        ("amused", 16, ()),
        ("mnist-f4", 4, ()),
        ("tiny", 2, (1,)),
    ],
)
def test_presets_build_taming_layout(name, factor, attn_levels):
    cfg = VQGANConfig.preset(name)
    assert cfg.downsample_factor == factor and cfg.attn_levels == attn_levels
    with torch.device("meta"):  # shapes only, no memory
        sd = VQGAN(cfg).state_dict()
    inferred = _infer_from_shapes(sd)
    for key in ("in_channels", "ch", "ch_mult", "num_res_blocks", "z_channels", "out_ch"):
        assert inferred[key] == getattr(cfg, key), key
    assert (inferred["embed_dim"], inferred["n_embed"]) == (cfg.embed_dim, cfg.n_embed)
    assert inferred["attn_levels"] == attn_levels
    assert inferred["mid_attention"] == cfg.mid_attention
    # decoder: R+1 blocks per level, indexed by level, attention at the same levels
    L, R = len(cfg.ch_mult), cfg.num_res_blocks
    for i in range(L):
        assert sd[f"decoder.up.{i}.block.{R}.conv2.weight"].shape[0] == cfg.ch * cfg.ch_mult[i]
        assert f"decoder.up.{i}.block.{R + 1}.conv1.weight" not in sd
        assert (f"decoder.up.{i}.attn.{R}.q.weight" in sd) == (i in attn_levels)
        assert (f"decoder.up.{i}.upsample.conv.weight" in sd) == (i > 0)
        assert (f"encoder.down.{i}.downsample.conv.weight" in sd) == (i < L - 1)


def test_preset_values_and_overrides():
    ffhq = VQGANConfig.preset("ffhq1024-f32")
    assert (ffhq.embed_dim, ffhq.n_embed, ffhq.z_channels, ffhq.resolution) == (256, 8192, 256, 1024)
    assert ffhq.ch_mult == (1, 1, 2, 2, 4, 4) and ffhq.num_res_blocks == 1
    assert VQGANConfig.preset("ldm-vq-f8", n_embed=256).n_embed == 256
    assert VQGANConfig.preset("mnist-f4").in_channels == 1
    with pytest.raises(ValueError, match="unknown VQGANConfig preset 'nope'.*tiny"):
        VQGANConfig.preset("nope")
    with pytest.raises(ValueError, match="unknown key.*'chx'.*valid keys"):
        VQGANConfig.preset("tiny", chx=3)


def test_config_json_round_trip_and_validation():
    cfg = VQGANConfig.preset("ldm-vq-f8")
    assert VQGANConfig.from_dict(json.loads(_helpers.config_to_json(cfg))) == cfg
    bad = [
        (dict(norm_groups=3), "divisible by norm_groups=3"),
        (dict(quantizer="gumbel", z_channels=8, embed_dim=4), "z_channels == embed_dim"),
        (dict(attn_resolutions=(8,)), r"attn_resolutions \[8\] match no level"),
        (dict(double_z=True), "double_z"),
        (dict(pixel_range="0,255"), "pixel_range"),
        (dict(quantizer="fsq"), "quantizer"),
        (dict(remap_used=33), "remap_used=33 exceeds n_embed=32"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(resolution=33), "multiple of the downsample factor"),
        (dict(ch=True), "ch must be an integer"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(TINY, **overrides)
    assert dataclasses.replace(TINY, ch_mult=[1, 2]).ch_mult == (1, 2)
