"""VQ-GAN: taming layout and maths, quantizer, remap/gumbel, tiling, native I/O (its config:
test_vqgan_config.py; the pixel codec: test_pixel_codec.py).

The maths is checked against `_taming_reference`, an independent functional re-implementation
of taming's Encoder/Decoder written from taming's source (explicit bmm/softmax attention, the
`hs` list, index loops) that reads the state dict by key name.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib import _helpers
from comfyui_sundae.sundae_lib import vqgan_modules as vm
from comfyui_sundae.sundae_lib.vqgan import (
    VQGAN,
    PixelCodec,
    VQGANConfig,
    load_vqgan_native,
    save_vqgan,
)
from einops import rearrange

TINY = VQGANConfig.preset("tiny")


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (GroupNorm affine too), so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.startswith("quantize.embed"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(1, p[0].numel()))))
    return model.eval()


def _tiny(**overrides) -> VQGAN:
    """A tiny random model whose codebook is drawn from its own latents, so that tokens of
    random images are diverse (a plain random codebook collapses onto one or two codes)."""
    model = _randomize(VQGAN(dataclasses.replace(TINY, **overrides) if overrides else TINY))
    with torch.no_grad():
        latent = model.encode_to_latent(_images(b=4, h=16, w=16, seed=99))
        rows = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(5))
        codes = rows[pick[: model.config.n_embed]]
        if model.config.quantizer == "vq":
            model.quantize.embedding.weight.copy_(codes)
        else:  # logits = (code - mean) . (z - mean): the argmax is spread over codes too
            centred = codes - rows.mean(dim=0)
            model.quantize.proj.weight.copy_(centred[:, :, None, None])
            model.quantize.proj.bias.copy_(-(centred @ rows.mean(dim=0)))
    return model


def _images(b=2, c=3, h=32, w=32, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g) * 2 - 1


# --------------------------------------------------------------------------------------------
# independent functional taming reference (from taming/modules/diffusionmodules/model.py)
# --------------------------------------------------------------------------------------------


def _gn(sd, p, x, groups):
    return F.group_norm(x, groups, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, stride=1, padding=1):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride=stride, padding=padding)


def _resnet(sd, p, x, groups):
    h = _gn(sd, p + ".norm1", x, groups)
    h = h * torch.sigmoid(h)
    h = _conv(sd, p + ".conv1", h)
    h = _gn(sd, p + ".norm2", h, groups)
    h = h * torch.sigmoid(h)
    h = _conv(sd, p + ".conv2", h)
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(sd, p + ".nin_shortcut", x, padding=0)
    return x + h


def _attn(sd, p, x, groups):
    h_ = _gn(sd, p + ".norm", x, groups)
    q = _conv(sd, p + ".q", h_, padding=0)
    k = _conv(sd, p + ".k", h_, padding=0)
    v = _conv(sd, p + ".v", h_, padding=0)
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    k = k.reshape(b, c, h * w)
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
    w_ = torch.nn.functional.softmax(w_, dim=2)
    v = v.reshape(b, c, h * w)
    h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _conv(sd, p + ".proj_out", h_, padding=0)


def _mid(sd, p, h, groups):
    h = _resnet(sd, p + ".block_1", h, groups)
    if p + ".attn_1.q.weight" in sd:
        h = _attn(sd, p + ".attn_1", h, groups)
    return _resnet(sd, p + ".block_2", h, groups)


def _ref_encode(sd, cfg, x):
    g, L, R = cfg.norm_groups, len(cfg.ch_mult), cfg.num_res_blocks
    hs = [_conv(sd, "encoder.conv_in", x)]
    for i in range(L):
        for j in range(R):
            h = _resnet(sd, f"encoder.down.{i}.block.{j}", hs[-1], g)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"encoder.down.{i}.attn.{j}", h, g)
            hs.append(h)
        if i != L - 1:
            if f"encoder.down.{i}.downsample.conv.weight" in sd:
                y = torch.nn.functional.pad(hs[-1], (0, 1, 0, 1), mode="constant", value=0)
                hs.append(_conv(sd, f"encoder.down.{i}.downsample.conv", y, stride=2, padding=0))
            else:
                hs.append(torch.nn.functional.avg_pool2d(hs[-1], kernel_size=2, stride=2))
    h = _mid(sd, "encoder.mid", hs[-1], g)
    h = _gn(sd, "encoder.norm_out", h, g)
    h = _conv(sd, "encoder.conv_out", h * torch.sigmoid(h))
    return _conv(sd, "quant_conv", h, padding=0)


def _ref_decode_codes(sd, cfg, z_q):
    g, L, R = cfg.norm_groups, len(cfg.ch_mult), cfg.num_res_blocks
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z_q, padding=0))
    h = _mid(sd, "decoder.mid", h, g)
    for i in reversed(range(L)):
        for j in range(R + 1):
            h = _resnet(sd, f"decoder.up.{i}.block.{j}", h, g)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"decoder.up.{i}.attn.{j}", h, g)
        if i != 0:
            h = torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            if f"decoder.up.{i}.upsample.conv.weight" in sd:
                h = _conv(sd, f"decoder.up.{i}.upsample.conv", h)
    h = _gn(sd, "decoder.norm_out", h, g)
    return _conv(sd, "decoder.conv_out", h * torch.sigmoid(h))


def _brute_force_ids(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[b, d, h, w] -> [b, h, w] nearest code by float64 cdist."""
    b, d, h, w = z.shape
    rows = z.permute(0, 2, 3, 1).reshape(-1, d).double()
    return torch.cdist(rows, codebook.double()).argmin(dim=1).reshape(b, h, w)


# --------------------------------------------------------------------------------------------
# layout and maths
# --------------------------------------------------------------------------------------------


def test_taming_key_names_tiny():
    sd = VQGAN(TINY).state_dict()
    expected = {
        "encoder.conv_in.weight": (8, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (8,),
        "encoder.down.1.block.0.nin_shortcut.weight": (16, 8, 1, 1),
        "encoder.down.1.attn.0.q.weight": (16, 16, 1, 1),
        "encoder.down.0.downsample.conv.weight": (8, 8, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (16, 16, 1, 1),
        "encoder.norm_out.bias": (16,),
        "encoder.conv_out.weight": (8, 16, 3, 3),
        "decoder.conv_in.weight": (16, 8, 3, 3),
        "decoder.up.1.block.0.conv1.weight": (16, 16, 3, 3),
        "decoder.up.1.attn.1.k.weight": (16, 16, 1, 1),
        "decoder.up.1.upsample.conv.weight": (16, 16, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (8, 16, 1, 1),
        "decoder.up.0.block.1.conv2.weight": (8, 8, 3, 3),
        "decoder.conv_out.weight": (3, 8, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "quantize.embedding.weight": (32, 8),
        "post_quant_conv.weight": (8, 8, 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    absent = ["encoder.down.1.downsample.conv.weight", "decoder.up.0.upsample.conv.weight", "encoder.down.0.attn.0.q.weight", "quantize.used"]
    assert not [k for k in absent if k in sd]
    assert all(k.split(".")[0] in {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"} for k in sd)


def test_variant_key_names():
    sd = VQGAN(dataclasses.replace(TINY, mid_attention=False, resamp_with_conv=False)).state_dict()
    assert not any(".attn_1." in k or "sample.conv" in k for k in sd)
    sd = VQGAN(dataclasses.replace(TINY, quantizer="gumbel", remap_used=5)).state_dict()
    assert tuple(sd["quantize.proj.weight"].shape) == (32, 8, 1, 1)
    assert tuple(sd["quantize.embed.weight"].shape) == (32, 8)
    assert "quantize.embedding.weight" not in sd
    assert sd["quantize.used"].dtype == torch.int64 and sd["quantize.used"].shape == (5,)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(mid_attention=False, resamp_with_conv=False), dict(ch_mult=(1, 2, 2), num_res_blocks=2)],
)
def test_matches_functional_taming_reference(overrides):
    model = _tiny(**overrides)
    cfg, sd = model.config, model.state_dict()
    x = _images(h=32, w=24)
    with torch.no_grad():
        latent = model.encode_to_latent(x)
        torch.testing.assert_close(latent, _ref_encode(sd, cfg, x), rtol=1e-4, atol=1e-5)
        z_q, tokens = model.quantize(latent)
        assert torch.equal(tokens, _brute_force_ids(latent, sd["quantize.embedding.weight"]))
        out = model.decode(tokens)
        torch.testing.assert_close(out, _ref_decode_codes(sd, cfg, z_q), rtol=1e-4, atol=1e-5)
    assert out.shape == (2, 3, 32, 24)


def test_inference_in_place_path_equals_autograd_path():
    model = _tiny()
    x = _images()
    with torch.no_grad():  # blocks overwrite temporaries in place
        fast = model.decode_codes(model.encode_to_latent(x))
    slow = model.decode_codes(model.encode_to_latent(x))  # graph recorded: out-of-place
    assert slow.requires_grad and torch.equal(fast, slow.detach())


def test_attention_matches_explicit_softmax_at_large_scale():
    block = _randomize(vm.AttnBlock(16, groups=4))
    x = torch.randn(2, 16, 9, 7) * 3
    sd = {f"a.{k}": v for k, v in block.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(block(x), _attn(sd, "a", x, 4), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# quantizer
# --------------------------------------------------------------------------------------------


def test_quantizer_matches_brute_force_and_chunks(monkeypatch):
    q = vm.VectorQuantizer(64, 6)
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(3, 6, 5, 7)
    z_q, tokens = q(z)
    ref = _brute_force_ids(z, q.embedding.weight)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 5, 7)
    assert torch.equal(tokens, ref)
    assert torch.equal(z_q, q.embedding.weight[ref].permute(0, 3, 1, 2))
    monkeypatch.setattr(vm, "_DISTANCE_CHUNK_ELEMENTS", 64 * 4)  # 4 rows per chunk
    assert torch.equal(q(z)[1], ref)


def test_quantizer_ties_take_first_index():
    q = vm.VectorQuantizer(6, 2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[5.0, 5], [1, 0], [0, 1], [-1, 0], [1, 0], [9, 9]]))
    # origin: codes 1, 2, 3 and 4 are all at distance 1 -> 1; (1, 0): codes 1 and 4 identical -> 1
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 3)
    assert q(z)[1].tolist() == [[[1, 1, 2]]]


def test_gumbel_argmax_and_ties():
    model = _tiny(quantizer="gumbel")
    x = _images()
    with torch.no_grad():
        latent = model.encode_to_latent(x)
        logits = torch.einsum("bchw,kc->bkhw", latent, model.quantize.proj.weight[:, :, 0, 0])
        logits = logits + model.quantize.proj.bias[None, :, None, None]
        z_q, tokens = model.quantize(latent)
    assert torch.equal(tokens, logits.argmax(dim=1))
    assert torch.equal(z_q, model.quantize.embed.weight[tokens].permute(0, 3, 1, 2))
    assert torch.equal(model.encode(x), tokens)  # deterministic
    assert len(tokens.unique()) > 8
    with torch.no_grad():
        model.quantize.proj.weight.zero_()
        model.quantize.proj.bias.zero_()
        model.quantize.proj.bias[[3, 7]] = 1.0
    assert model.encode(x).unique().tolist() == [3]


def test_lookup_then_quantize_is_identity_and_encode_is_batch_independent():
    model = _tiny()
    tokens = torch.randint(0, 32, (2, 6, 5))
    assert torch.equal(model.quantize(model.lookup(tokens))[1], tokens)
    x = _images(b=3)
    together = model.encode(x)
    assert torch.equal(together, torch.cat([model.encode(x[i : i + 1]) for i in range(3)]))
    assert torch.equal(model.encode(x), together)
    torch.testing.assert_close(model.decode(tokens), model.decode_codes(model.lookup(tokens)))


def test_remap_reduced_vocabulary():
    used = torch.tensor([30, 2, 17, 5, 9])
    model = _tiny(remap_used=5)
    with torch.no_grad():
        model.quantize.used.copy_(used)
    full = VQGAN(TINY).eval()
    full.load_state_dict({k: v for k, v in model.state_dict().items() if k != "quantize.used"})
    assert model.codebook_size == 5 and full.codebook_size == 32
    x = _images()
    tokens = model.encode(x)
    latent = full.encode_to_latent(x).detach()
    # nearest *used* code, as a reduced id
    ref_full = used[_brute_force_ids(latent, model.quantize.embedding.weight[used])]
    assert torch.equal(used[tokens], ref_full)
    assert tokens.max() < 5
    torch.testing.assert_close(model.decode(tokens), full.decode(used[tokens]), rtol=0, atol=0)
    assert torch.equal(model.quantize.full_to_reduced_ids(used[tokens]), tokens)
    with pytest.raises(ValueError, match=r"codes \[0\] are not in this model's remap"):
        model.quantize.full_to_reduced_ids(torch.tensor([0]))
    with pytest.raises(ValueError, match="5 codes"):
        model.decode(torch.full((1, 2, 2), 5))


def test_remap_buffer_is_checked_on_load():
    model = _tiny(remap_used=3)
    sd = model.state_dict()
    with pytest.raises(ValueError, match=r"quantize.used holds code indices in \[0, 40\]"):
        model.load_state_dict({**sd, "quantize.used": torch.tensor([0, 1, 40])})
    with pytest.raises(ValueError, match="twice"):
        model.load_state_dict({**sd, "quantize.used": torch.tensor([4, 1, 4])})


# --------------------------------------------------------------------------------------------
# API policies: pixel range, padding, errors, training forward
# --------------------------------------------------------------------------------------------


def test_pixel_range_zero_one_converts_inside():
    m11 = _tiny()
    m01 = VQGAN(dataclasses.replace(TINY, pixel_range="0,1")).eval()
    m01.load_state_dict(m11.state_dict())
    x = _images()
    assert torch.equal(m01.encode(x), m11.encode((x + 1) / 2))
    assert not torch.equal(m01.encode(x), m11.encode(x))
    tokens = torch.randint(0, 32, (2, 4, 4))
    torch.testing.assert_close(m01.decode(tokens), m11.decode(tokens) * 2 - 1, rtol=0, atol=1e-6)


def test_non_divisible_sizes_are_replicate_padded():
    model = _tiny(ch_mult=(1, 2, 2))  # f = 4
    x = _images(h=13, w=10)
    assert model.padded_size(13, 10) == (16, 12) and model.token_grid(13, 10) == (4, 3)
    tokens = model.encode(x)
    assert tokens.shape == (2, 4, 3)
    padded = torch.cat([x, x[:, :, -1:].expand(-1, -1, 3, -1)], dim=2)
    padded = torch.cat([padded, padded[..., -1:].expand(-1, -1, -1, 2)], dim=3)
    assert torch.equal(tokens, model.encode(padded))
    assert torch.equal(model.encode_to_latent(x), model.encode_to_latent(padded))
    assert len(tokens.unique()) > 4  # a diverse grid, so the comparison means something
    assert model.decode(tokens).shape[-2:] == (16, 12) == model.image_size(4, 3)
    with pytest.raises(ValueError, match="13x10 is not a multiple of the downsample factor 4"):
        model.encode(x, pad="error")
    with pytest.raises(ValueError, match="pad must be one of"):
        model.encode(x, pad="wrap")


def test_bad_inputs_name_the_problem():
    model = _tiny()
    with pytest.raises(ValueError, match="3-channel images but got 1 channels"):
        model.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"4 dims\), got shape \(3, 8, 8\)"):
        model.encode(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="float images.*uint8"):
        model.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"token ids span \[0, 32\].*32 codes"):
        model.decode(torch.tensor([[[0, 32]]]))
    with pytest.raises(ValueError, match=r"token ids span \[-1, 0\]"):
        model.decode(torch.tensor([[[0, -1]]]))
    with pytest.raises(ValueError, match=r"integer codebook indices \(int64 \[b, h, w\]\), got dtype torch.float32"):
        model.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"shape \[b, h, w\], got \(2, 2\) \(add a batch axis"):
        model.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tile must be"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.long), tile=0)
    with pytest.raises(ValueError, match="overlap must be"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.long), tile=2, overlap=2)
    with pytest.raises(ValueError, match=r"latents \[b, 8, h, w\]"):
        model.quantize(torch.zeros(1, 3, 2, 2))
    assert model.decode(torch.zeros(1, 2, 2, dtype=torch.int32)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.encode(torch.full((1, 3, 8, 8), float("nan")))


def test_model_pickles_and_deep_copies():
    import copy
    import io

    model = _tiny(remap_used=4)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the load post-hook is a module-level function, not a lambda
    clone = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="quantize.used"):
        clone.load_state_dict({**model.state_dict(), "quantize.used": torch.tensor([0, 1, 2, 99])})


def test_training_forward_straight_through():
    model = _tiny().train()
    x = _images()
    out = model(x)
    torch.testing.assert_close(out.recon, model.decode_codes(out.quantized), rtol=1e-5, atol=1e-5)
    (out.recon.square().mean() + (out.quantized - out.latent.detach()).square().mean()).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through path
    assert model.quantize.embedding.weight.grad.abs().sum() > 0  # codebook term
    assert model.last_layer is model.decoder.conv_out.weight


# --------------------------------------------------------------------------------------------
# tiled decode
# --------------------------------------------------------------------------------------------


def test_seam_ramps_sum_to_one():
    from comfyui_sundae.sundae_lib.vqgan import _seam_ramp, _tile_starts

    end = _seam_ramp(8, 4, start=False, end=True, device="cpu")
    start = _seam_ramp(8, 4, start=True, end=False, device="cpu")
    torch.testing.assert_close(end[-4:] + start[:4], torch.ones(4))
    assert (end > 0).all() and (end[:4] == 1).all()
    assert _tile_starts(10, 4, 1) == [0, 3, 6] and _tile_starts(8, 4, 1) == [0, 2, 4]
    assert _tile_starts(32, 16, 4) == [0, 8, 16] and _tile_starts(32, 18, 4) == [0, 14]
    assert _tile_starts(3, 4, 1) == [0]


def test_tiled_decode_geometry_is_exact_for_a_pointwise_decoder(monkeypatch):
    model = _tiny()
    tokens = torch.randint(0, 32, (2, 11, 9))

    def pointwise(z_q):  # a decoder without spatial context: tiling must not change anything
        return F.interpolate(z_q[:, :3], scale_factor=2.0, mode="nearest")

    monkeypatch.setattr(model, "decode_codes", pointwise)
    full = model.decode(tokens)
    for tile, overlap in [(4, 1), (5, 2), (3, 0), (6, None)]:
        torch.testing.assert_close(model.decode(tokens, tile=tile, overlap=overlap), full, rtol=0, atol=1e-6)


def test_tiled_decode_close_to_full_and_exact_when_tile_covers_grid():
    model = _tiny()
    tokens = torch.randint(0, 32, (1, 12, 10))
    full = model.decode(tokens)
    assert torch.equal(model.decode(tokens, tile=12), full)
    tiled = model.decode(tokens, tile=8, overlap=2)
    assert tiled.shape == full.shape
    # bounded: each tile's GroupNorm statistics and receptive field stop at its border (with
    # norm groups of 2-4 channels this tiny model is a harsh case: ~10% of the output std)
    err = (tiled - full).abs().mean()
    assert err < 0.2 * full.std()
    assert not torch.equal(tiled, full)
    assert (model.decode(tokens, tile=4, overlap=1) - full).abs().mean() > err  # bigger is closer


def test_tiled_encode_equals_untiled_for_a_local_encoder():
    """An encoder of convolutions only (no GroupNorm, no attention) whose receptive field reaches
    < overlap // 2 tokens: keeping each token from the window it is central in must reproduce the
    untiled tokens exactly, odd sizes (padded once, before tiling) included."""
    torch.manual_seed(0)
    model = _tiny()
    z = model.config.z_channels
    model.encoder = torch.nn.Sequential(  # f = 2, receptive field 6 px = 3 tokens wide
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, z, 4, stride=2, padding=1)
    )
    x = torch.rand(2, 3, 25, 21) * 2 - 1
    with torch.no_grad():  # a codebook drawn from these latents, so that tokens are diverse
        latents = rearrange(model.encode_to_latent(x), "b d h w -> (b h w) d")
        picks = torch.randperm(latents.shape[0])[: model.codebook_size]
        model.quantize.embedding.weight.copy_(latents[picks])
    full = model.encode(x)
    assert full.shape == (2, 13, 11) and full.unique().numel() > 10
    for tile, overlap in [(6, 4), (5, 4), (8, None), (4, 3)]:
        assert torch.equal(model.encode(x, tile=tile, overlap=overlap), full), (tile, overlap)
    assert not torch.equal(model.encode(x, tile=4, overlap=0), full)  # seams without overlap differ
    assert torch.equal(model.encode(x, tile=13), full)
    with pytest.raises(ValueError, match="VQGAN.encode: overlap must be an integer in \\[0, tile=4\\)"):
        model.encode(x, tile=4, overlap=4)


def test_tiled_encode_of_the_taming_encoder_is_close():
    """GroupNorm statistics and attention are per window: close, not equal (and exact when the
    tile covers the grid)."""
    torch.manual_seed(0)
    model = _tiny()
    x = torch.rand(1, 3, 32, 28) * 2 - 1
    full = model.encode(x)
    assert torch.equal(model.encode(x, tile=16), full)
    tiled = model.encode(x, tile=8, overlap=4)
    assert tiled.shape == full.shape == (1, 16, 14) and tiled.dtype == torch.long
    assert (tiled == full).float().mean() > 0.3


# --------------------------------------------------------------------------------------------
# native files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(quantizer="gumbel", remap_used=4)])
def test_save_load_native_round_trip(tmp_path, overrides):
    model = _tiny(**overrides)
    if overrides:
        with torch.no_grad():
            model.quantize.used.copy_(torch.tensor([7, 3, 31, 0]))
    path = save_vqgan(model, tmp_path / "m.safetensors")
    meta = _helpers.read_safetensors_metadata(path)
    assert meta["sundae.model_type"] == "vqgan" and json.loads(meta["sundae.config"])["ch"] == 8
    loaded = load_vqgan_native(path)
    assert loaded.config == model.config and not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    tokens = torch.randint(0, model.codebook_size, (1, 4, 4))
    assert torch.equal(loaded.decode(tokens), model.decode(tokens))


def test_native_load_errors_name_keys(tmp_path):
    model = _tiny()
    sd = model.state_dict()
    cfg_json = _helpers.config_to_json(model.config)
    dropped = {k: v for k, v in sd.items() if k != "decoder.up.0.block.1.conv2.bias"}
    _helpers.save_native(dropped, tmp_path / "a.safetensors", model_type="vqgan", config_json=cfg_json)
    with pytest.raises(ValueError, match="missing keys.*decoder.up.0.block.1.conv2.bias"):
        load_vqgan_native(tmp_path / "a.safetensors")
    extra = {**sd, "loss.discriminator.main.0.weight": torch.zeros(1)}
    _helpers.save_native(extra, tmp_path / "b.safetensors", model_type="vqgan", config_json=cfg_json)
    with pytest.raises(ValueError, match="unexpected keys.*loss.discriminator.main.0.weight"):
        load_vqgan_native(tmp_path / "b.safetensors")
    _helpers.save_native(sd, tmp_path / "c.safetensors", model_type="sundae_prior", config_json=cfg_json)
    with pytest.raises(ValueError, match="'sundae_prior' model, not a 'vqgan'"):
        load_vqgan_native(tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError):
        load_vqgan_native(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no weights to save.*pixel:levels=256,channels=1"):
        save_vqgan(PixelCodec(), tmp_path / "p.safetensors")
