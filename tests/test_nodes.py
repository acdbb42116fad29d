"""Unit tests of the ComfyUI nodes and the mask helpers, without ComfyUI (CPU, tiny models).

ComfyUI services are replaced through ``nodes.comfy_adapter`` (interrupt check, progress bar,
model folders); the models are tiny random ones built here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from comfyui_sundae.nodes import NODE_CLASS_MAPPINGS, comfy_adapter, sampler_node
from comfyui_sundae.nodes.types import CodecHandle, PriorHandle, TokenBatch
from comfyui_sundae.sundae_lib import (
    VQGAN,
    PixelCodec,
    VQGANConfig,
)
from comfyui_sundae.sundae_lib.masks import grow_token_mask, resize_mask, token_mask_from_pixels
from conftest import CPU, run_sampler, small_vqgan, tiny_prior
from einops import rearrange

Encode, Decode = NODE_CLASS_MAPPINGS["SundaeEncode"], NODE_CLASS_MAPPINGS["SundaeDecode"]
LatentMask, Sampler = NODE_CLASS_MAPPINGS["SundaeLatentMask"], NODE_CLASS_MAPPINGS["SundaeSampler"]
LoadVQGAN, LoadPrior = NODE_CLASS_MAPPINGS["SundaeLoadVQGAN"], NODE_CLASS_MAPPINGS["SundaeLoadPrior"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vq():
    return CodecHandle(small_vqgan(seed=0), "vq-f4.safetensors", CPU, torch.float32)  # f4, 256 codes


@pytest.fixture(scope="module")
def prior():
    model = tiny_prior(seed=0, codebook_size=256, grid=(7, 7), num_classes=10)
    return PriorHandle(model, "prior-vq.safetensors", CPU, torch.float32, codec="vqgan:factor=4", factor=4)


@pytest.fixture(scope="module")
def uncond_prior():
    model = tiny_prior(seed=1, codebook_size=256, grid=(7, 7), num_classes=0)
    return PriorHandle(model, "uncond.safetensors", CPU, torch.float32)


def encode(codec, image):
    with torch.inference_mode():
        return Encode().encode(codec, image)[0]


# --------------------------------------------------------------------------------------------
# mask helpers (hand-computed expectations)
# --------------------------------------------------------------------------------------------


def test_mask_rules_on_hand_made_cells():
    m = torch.zeros(8, 8)
    m[0, 0] = 1  # one pixel of the top-left 4x4 cell
    m[0:4, 4:8] = 1  # the whole top-right cell
    m[4:6, 4:8] = 1  # half of the bottom-right cell
    any_ = token_mask_from_pixels(m, factor=4, grid=(2, 2), rule="any")
    all_ = token_mask_from_pixels(m, factor=4, grid=(2, 2), rule="all")
    cov_half = token_mask_from_pixels(m, factor=4, grid=(2, 2), rule="coverage", threshold=0.5)
    cov_tenth = token_mask_from_pixels(m, factor=4, grid=(2, 2), rule="coverage", threshold=0.05)
    assert any_.dtype == torch.bool and any_.shape == (1, 2, 2)
    assert any_[0].tolist() == [[True, True], [False, True]]
    assert all_[0].tolist() == [[False, True], [False, False]]
    assert cov_half[0].tolist() == [[False, True], [False, True]]  # 8/16 >= 0.5
    assert cov_tenth[0].tolist() == [[True, True], [False, True]]  # 1/16 >= 0.05
    with pytest.raises(ValueError, match="rule 'most'"):
        token_mask_from_pixels(m, factor=4, grid=(2, 2), rule="most")
    with pytest.raises(ValueError, match="threshold"):
        token_mask_from_pixels(m, factor=4, grid=(2, 2), rule="coverage", threshold=0)


def test_grow_is_a_square_dilation_in_tokens():
    t = torch.zeros(1, 5, 5, dtype=torch.bool)
    t[0, 2, 2] = True
    g1 = grow_token_mask(t, 1)[0]
    assert g1.sum() == 9 and g1[1:4, 1:4].all()
    assert grow_token_mask(t, 2)[0].all()
    assert torch.equal(grow_token_mask(t, 0), t)
    m = torch.zeros(20, 20)
    m[8:12, 8:12] = 1
    grown = token_mask_from_pixels(m, factor=4, grid=(5, 5), grow=1)
    assert grown[0].sum() == 9


def test_any_size_mask_is_resized_and_loadimage_zero_mask_is_empty():
    zero = torch.zeros(1, 64, 64)  # LoadImage without alpha, whatever the image size
    assert not token_mask_from_pixels(zero, factor=4, grid=(7, 7), image_size=(28, 28)).any()
    big = torch.zeros(56, 56)  # a 2x larger mask over the left half of a 28x28 image
    big[:, :28] = 1
    tm = token_mask_from_pixels(big, factor=4, grid=(7, 7), image_size=(28, 28), rule="all")
    assert tm[0, :, :3].all() and not tm[0, :, 4:].any()
    assert resize_mask(torch.ones(3, 10, 10, dtype=torch.bool), (4, 6)).shape == (3, 4, 6)


def test_mask_follows_the_codec_padding_of_odd_sizes():
    # a 30x30 image on a factor-4 codec is padded to 32x32 by repeating the edge: the mask too
    m = torch.zeros(30, 30)
    m[:, 28:] = 1  # the last two pixel columns
    tm = token_mask_from_pixels(m, factor=4, grid=(8, 8), image_size=(30, 30), rule="all")
    assert tm[0, :, 7].all(), "columns 28..31 are all masked once the edge is repeated"
    assert not tm[0, :, :7].any()


def test_latent_mask_node_broadcasts_batches(vq):
    tokens = encode(vq, torch.rand(3, 28, 28, 3))
    mask = torch.zeros(1, 28, 28)
    mask[:, :8, :8] = 1
    out = LatentMask().apply(tokens, mask, "any", 0.5, 0)[0]
    # one mask serves all three images as it is: the sampler spreads it over the batch
    assert out.mask.shape == (1, 7, 7) and out.mask[:, :2, :2].all() and out.mask.sum() == 4
    assert out.tokens is tokens.tokens and tokens.mask is None  # input left as it was
    one = encode(vq, torch.rand(1, 28, 28, 3))
    two_masks = torch.zeros(2, 28, 28)
    two_masks[1] = 1
    out2 = LatentMask().apply(one, two_masks, "any", 0.5, 0)[0]
    assert out2.tokens.shape[0] == 2 and torch.equal(out2.tokens[0], out2.tokens[1])
    assert out2.mask[1].all() and not out2.mask[0].any()
    with pytest.raises(ValueError, match=r"mask batch \(2\) and the tokens batch \(3\)"):
        LatentMask().apply(tokens, two_masks, "any", 0.5, 0)
    flat = LatentMask().apply(one, torch.ones(28, 28), "all", 0.5, 0)[0]  # a [H, W] mask
    assert flat.mask.all()


# --------------------------------------------------------------------------------------------
# encode / decode
# --------------------------------------------------------------------------------------------


def test_pixel_codec_roundtrip_is_exact_and_grey_is_the_rgb_mean():
    codec = CodecHandle(PixelCodec(256), "pixels (256 levels, grey)", CPU, torch.float32)
    levels = torch.arange(256, dtype=torch.float32).reshape(1, 16, 16) / 255.0
    image = levels[..., None].expand(1, 16, 16, 3).contiguous()
    tb = encode(codec, image)
    assert torch.equal(tb.tokens[0], torch.arange(256).reshape(16, 16))  # level k -> token k
    red = torch.zeros(1, 2, 2, 3)
    red[..., 0] = 1.0  # mean of (1, 0, 0) = 1/3 -> level round(255 / 3) = 85
    assert encode(codec, red).tokens.unique().tolist() == [85]
    with torch.inference_mode():
        img = Decode().decode(codec, tb, 0)[0]
    assert img.shape == (1, 16, 16, 3) and img.dtype == torch.float32 and img.device == CPU
    assert torch.allclose(img, image, atol=1e-6)


def test_vqgan_encode_decode_odd_size_crops_back(vq):
    tb = encode(vq, torch.rand(2, 30, 26, 3))
    assert tb.grid == (8, 7) and tb.image_size == (30, 26) and tb.factor == 4 and tb.mask is None
    assert tb.tokens.dtype == torch.int64 and tb.tokens.device == CPU
    with torch.inference_mode():
        img = Decode().decode(vq, tb, 0)[0]
        tiled = Decode().decode(vq, tb, 16)[0]
    assert img.shape == tiled.shape == (2, 30, 26, 3)
    assert img.min() >= 0 and img.max() <= 1 and torch.isfinite(tiled).all()


class _FakeCodec(torch.nn.Module):
    """Decodes zeros; runs out of memory unless the tile is at most ``fits`` tokens."""

    downsample_factor, codebook_size, in_channels = 4, 8, 3

    def __init__(self, fits, error=None, oom=None):
        super().__init__()
        self.fits, self.error, self.calls = fits, error, []
        self.oom = oom or torch.OutOfMemoryError("CUDA out of memory (fake)")

    def decode(self, tokens, tile=None):
        self.calls.append(tile)
        if self.error is not None:
            raise self.error
        if tile is None or tile > self.fits:
            raise self.oom
        b, h, w = tokens.shape
        return torch.zeros(b, 3, h * 4, w * 4)


def test_decode_halves_the_tile_on_out_of_memory():
    tokens = TokenBatch(torch.zeros(1, 64, 64, dtype=torch.long), None, 4)  # 256 px
    fake = _FakeCodec(fits=16)
    img = Decode().decode(CodecHandle(fake, "fake", CPU, torch.float32), tokens, 0)[0]
    assert img.shape == (1, 256, 256, 3)
    assert fake.calls == [None, 32, 16]  # whole image, 128 px tiles, 64 px tiles
    never = _FakeCodec(fits=0)
    with pytest.raises(torch.OutOfMemoryError):
        Decode().decode(CodecHandle(never, "fake", CPU, torch.float32), tokens, 0)
    assert never.calls == [None, 32, 16]  # gives up below 64 px
    broken = _FakeCodec(fits=64, error=RuntimeError("not memory"))
    with pytest.raises(RuntimeError, match="not memory"):
        Decode().decode(CodecHandle(broken, "fake", CPU, torch.float32), tokens, 0)
    assert broken.calls == [None]  # other errors are not retried


CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. Error code 12"


def test_decode_falls_back_to_tiles_on_a_cpu_allocation_failure():
    """On the CPU, running out of memory is a plain RuntimeError, not torch.OutOfMemoryError."""
    tokens = TokenBatch(torch.zeros(1, 64, 64, dtype=torch.long), None, 4)
    fake = _FakeCodec(fits=32, oom=RuntimeError(CPU_OOM))
    img = Decode().decode(CodecHandle(fake, "fake", CPU, torch.float32), tokens, 0)[0]
    assert img.shape == (1, 256, 256, 3) and fake.calls == [None, 32]


def test_encode_tiles_when_out_of_memory(vq, monkeypatch):
    image = torch.rand(1, 128, 120, 3)
    expected = encode(vq, image)
    whole = vq.model.encode
    calls = []

    def encode_or_oom(x, tile=None):
        calls.append(tile)
        if tile is None:
            raise RuntimeError(CPU_OOM)
        return whole(x, tile=tile)

    monkeypatch.setattr(vq.model, "encode", encode_or_oom)
    tiled = encode(vq, image)
    assert calls == [None, 16]  # 128 px image, then 64 px tiles (16 tokens at factor 4)
    assert tiled.tokens.shape == expected.tokens.shape == (1, 32, 30) and tiled.image_size == (128, 120)
    # tiles of the taming encoder (GroupNorm per window) give tokens close to the whole image's
    assert (tiled.tokens == expected.tokens).float().mean() > 0.3
    monkeypatch.setattr(vq.model, "encode", lambda x, tile=None: calls.append(tile) or whole(x[:, :, :0]))
    calls.clear()
    with pytest.raises(ValueError):  # other errors are not retried
        encode(vq, image)
    assert calls == [None]


def test_encode_tile_size_widget_tiles(vq, monkeypatch):
    """tile_size > 0 encodes in tiles of that many pixels (as Decode's widget does); 0 = whole."""
    from comfyui_sundae.nodes.codec_nodes import SundaeEncode

    image = torch.rand(1, 128, 120, 3)
    whole = vq.model.encode
    calls = []
    monkeypatch.setattr(vq.model, "encode", lambda x, tile=None: calls.append(tile) or whole(x, tile=tile))
    (tiled,) = SundaeEncode().encode(vq, image, tile_size=64)
    (plain,) = SundaeEncode().encode(vq, image, tile_size=0)
    assert calls == [16, None]  # 64 px tiles = 16 tokens at factor 4, then the whole image
    assert tiled.tokens.shape == plain.tokens.shape == (1, 32, 30)
    assert "tile_size" in SundaeEncode.INPUT_TYPES()["required"]


def test_decode_rejects_tokens_of_another_codec(vq):
    small = CodecHandle(PixelCodec(16), "pixels (16 levels, grey)", CPU, torch.float32)
    tb = TokenBatch(torch.full((1, 4, 4), 200, dtype=torch.long), None, 1)
    with pytest.raises(ValueError, match=r"token ids span \[200, 200\] but the VQ-GAN 'pixels \(16 levels, grey\)' has 16 codes: tokens must lie in \[0, 16\)"):
        Decode().decode(small, tb, 0)
    with pytest.raises(ValueError, match="factor-1 codec but the VQ-GAN 'vq-f4.safetensors' has factor 4"):
        Decode().decode(vq, tb, 0)


# --------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------


def test_codebook_mismatch_names_both_files(prior):
    cfg = VQGANConfig.preset("tiny")  # 32 codes
    other = CodecHandle(VQGAN(cfg).eval(), "other-vq.safetensors", CPU, torch.float32)
    with pytest.raises(ValueError) as err:
        run_sampler(prior, vqgan=other)
    msg = str(err.value)
    assert "prior 'prior-vq.safetensors' has 256 codes but the VQ-GAN 'other-vq.safetensors' has 32" in msg
    assert "load the VQ-GAN the prior was trained on" in msg


def test_class_label_errors(prior, uncond_prior):
    with pytest.raises(ValueError, match=r"class_label 10 is out of range.*10 classes.*0\.\.9"):
        run_sampler(prior, class_label=10)
    with pytest.raises(ValueError, match="class_label 3: this prior is unconditional.*-1 / 'none'"):
        run_sampler(uncond_prior, class_label=3)
    no_null = tiny_prior(seed=None, codebook_size=256, grid=(7, 7), num_classes=10, null_class=False,
                         class_dropout=0.0)
    with pytest.raises(ValueError, match=r"no null class.*0\.\.9"):
        run_sampler(PriorHandle(no_null, "nonull", CPU, torch.float32), class_label=-1)
    assert run_sampler(prior, class_label=9, cfg_scale=2.0).tokens.shape == (1, 7, 7)


def test_empty_mask_returns_input_without_sampling(vq, prior, monkeypatch):
    tokens = encode(vq, torch.rand(1, 28, 28, 3))
    masked = LatentMask().apply(tokens, torch.zeros(1, 64, 64), "any", 0.5, 0)[0]  # LoadImage, no alpha
    assert not masked.mask.any()

    def boom(*a, **k):
        raise AssertionError("the prior must not run for an empty mask")

    monkeypatch.setattr(prior.model, "forward", boom)  # the library's one empty-mask shortcut
    out = run_sampler(prior, tokens=masked, vqgan=vq)
    assert torch.equal(out.tokens, tokens.tokens) and out.image_size == (28, 28)
    out3 = run_sampler(prior, tokens=masked, batch_size=3)
    assert out3.tokens.shape == (3, 7, 7) and (out3.tokens == tokens.tokens).all()


def test_one_mask_over_several_images_keeps_each_images_tokens(vq, prior):
    """Latent Mask keeps one mask as [1, h, w]; sample() spreads it over every image's samples."""
    tokens = encode(vq, torch.rand(2, 28, 28, 3))
    mask = torch.zeros(1, 28, 28)
    mask[:, :12, :] = 1  # the top 3 token rows
    masked = LatentMask().apply(tokens, mask, "any", 0.5, 0)[0]
    out = run_sampler(prior, tokens=masked, batch_size=2, seed=4)
    assert out.tokens.shape == (4, 7, 7) and out.mask is masked.mask
    want = tokens.tokens.repeat_interleave(2, 0)  # image 0, image 0, image 1, image 1
    assert torch.equal(out.tokens[:, 3:], want[:, 3:])
    assert not torch.equal(out.tokens[:, :3], want[:, :3])


def test_inpainting_keeps_unmasked_tokens_for_every_sample(vq, prior):
    tokens = encode(vq, torch.rand(2, 28, 28, 3))
    mask = torch.zeros(2, 28, 28)
    mask[:, 8:20, 8:20] = 1
    masked = LatentMask().apply(tokens, mask, "any", 0.5, 0)[0]
    out = run_sampler(prior, tokens=masked, batch_size=3, seed=3)
    keep = ~masked.mask.repeat_interleave(3, 0)
    want = tokens.tokens.repeat_interleave(3, 0)
    assert out.tokens.shape == (6, 7, 7)
    assert torch.equal(out.tokens[keep], want[keep])
    assert not torch.equal(out.tokens[~keep], want[~keep])  # 9 random tokens x 6 all equal: ~impossible


def test_seed_is_reproducible(prior):
    a, b, c = (run_sampler(prior, seed=s, batch_size=2).tokens for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_size_is_rounded_to_the_codec_factor(prior, vq, caplog):
    caplog.set_level("INFO", logger=sampler_node.__name__)
    out = run_sampler(prior, vqgan=vq, width=30, height=21)
    assert out.grid == (5, 8) and out.factor == 4  # 21/4 = 5.25 -> 5, 30/4 = 7.5 -> 8
    assert "generating 32x20 px (8x5 tokens, factor 4)" in caplog.text
    assert run_sampler(prior, width=0, height=0).grid == (7, 7)  # the trained grid
    assert run_sampler(prior, width=44).grid == (7, 11)  # factor from the prior's metadata
    unknown = dataclasses.replace(prior, factor=None, codec=None)
    with pytest.raises(ValueError, match="connect the VQ-GAN"):
        run_sampler(unknown, width=64, height=64)
    tokens = run_sampler(unknown)
    assert tokens.factor is None
    with torch.inference_mode():
        assert Decode().decode(vq, tokens, 0)[0].shape == (1, 28, 28, 3)  # takes the codec's factor


class _Interrupted(Exception):
    pass


def test_cancel_stops_within_one_step(prior, monkeypatch):
    state = {"forwards": 0, "interrupt": False}

    def check():
        if state["interrupt"]:
            raise _Interrupted()

    def count(_module, _args, _out):
        state["forwards"] += 1
        if state["forwards"] == 3:
            state["interrupt"] = True  # the user presses Cancel during the third step

    monkeypatch.setattr(comfy_adapter, "throw_if_interrupted", check)
    handle = prior.model.register_forward_hook(count)
    try:
        with pytest.raises(_Interrupted):
            run_sampler(prior, steps=50)
        assert state["forwards"] == 3, "no model call may start after the interrupt"
        state.update(forwards=0, interrupt=True)
        with pytest.raises(_Interrupted):
            run_sampler(prior, steps=50)
        assert state["forwards"] == 0
    finally:
        handle.remove()


class _Bar:
    def __init__(self, total):
        self.total, self.updates = total, []

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total, preview))


def test_previews_are_throttled_to_about_once_a_second(prior, vq, monkeypatch):
    t = {"now": 0.0}
    bars = []
    monkeypatch.setattr(sampler_node, "clock", lambda: t["now"])
    monkeypatch.setattr(comfy_adapter, "progress_bar", lambda total: bars.append(_Bar(total)) or bars[-1])

    def tick(*_):
        t["now"] += 0.25  # every model call takes a quarter of a second

    handle = prior.model.register_forward_hook(tick)
    try:
        run_sampler(prior, steps=20, vqgan=vq)
        run_sampler(prior, steps=8)  # no VQ-GAN: progress without previews
    finally:
        handle.remove()
    with_vq, without = bars
    steps = [u for u in with_vq.updates if u[2] is not None]
    assert [u[0] for u in steps] == [1, 5, 9, 13, 17]
    fmt, pil, size = steps[0][2]
    assert fmt == "JPEG" and size == 512 and pil.size == (28, 28) and pil.mode == "RGB"
    assert [u[0] for u in with_vq.updates] == list(range(1, 21)) + [20]
    assert all(u[2] is None for u in without.updates) and len(without.updates) == 9


def test_cancel_inside_a_step_reraises_comfyuis_interrupt(prior, monkeypatch):
    """ComfyUI's check is called between the prior's blocks, so Cancel stops a long step early."""
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] == 4:  # the node's check at start; in the forward: before block 1, inside
            raise _Interrupted()  # it (attention | FF), then before the inner level: raise

    finished, blocks = [], []
    monkeypatch.setattr(comfy_adapter, "throw_if_interrupted", check)
    handles = [prior.model.register_forward_hook(lambda *_: finished.append(1))]
    handles += [m.register_forward_hook(lambda *_: blocks.append(1))
                for m in prior.model.modules() if type(m).__name__ == "Block"]
    try:
        with pytest.raises(_Interrupted):
            run_sampler(prior, steps=50)
    finally:
        for h in handles:
            h.remove()
    assert finished == [] and len(blocks) == 1, "the first forward stopped after its first block"


def _timed_preview_run(prior, vq, monkeypatch, decode_cost, **kw):
    """Sampler run on a fake clock (0.25 s per model call, ``decode_cost`` s per decode); returns
    the token grids the previews decoded and the previews the progress bar got."""
    t = {"now": 0.0}
    bars, decoded = [], []
    monkeypatch.setattr(sampler_node, "clock", lambda: t["now"])
    monkeypatch.setattr(comfy_adapter, "progress_bar", lambda total: bars.append(_Bar(total)) or bars[-1])
    whole = type(vq.model).decode.__get__(vq.model)  # the real one, also on a second call

    def decode(tokens, **k):
        decoded.append(tuple(tokens.shape))
        t["now"] += decode_cost
        return whole(tokens, **k)

    monkeypatch.setattr(vq.model, "decode", decode)
    handle = prior.model.register_forward_hook(lambda *_: t.__setitem__("now", t["now"] + 0.25))
    try:
        run_sampler(prior, vqgan=vq, **kw)
    finally:
        handle.remove()
    return decoded, [u[2] for u in bars[0].updates if u[2] is not None]


def test_previews_decode_a_downscaled_view(prior, vq, monkeypatch):
    monkeypatch.setattr(sampler_node, "PREVIEW_MAX_SIZE", 16)  # 28 px image: every 2nd token
    decoded, previews = _timed_preview_run(prior, vq, monkeypatch, 0.0, steps=5)
    assert decoded == [(1, 4, 4), (1, 4, 4)]  # steps 1 and 5, the 7x7 grid at stride 2
    assert previews[0][2] == 16 and previews[0][1].size == (14, 14)


def test_downscaled_preview_keeps_a_pixel_codecs_interleaved_channels(monkeypatch):
    codec = PixelCodec(16, channels=3)  # tokens [b, H, W*3]: R, G, B interleaved along the width
    monkeypatch.setattr(sampler_node, "PREVIEW_MAX_SIZE", 2)  # a 4x4 image: every 2nd pixel
    tokens = torch.randint(0, 16, (1, 4, 12))
    progress = sampler_node._Progress(3, CodecHandle(codec, "px", CPU, torch.float32), TokenBatch(tokens, None, None))
    _fmt, pil, _size = progress._decode_preview(tokens)
    assert pil.size == (2, 2)
    seen = torch.tensor(np.asarray(pil), dtype=torch.float32) / 255 * 2 - 1
    torch.testing.assert_close(seen, rearrange(codec.decode(tokens)[0, :, ::2, ::2], "c h w -> h w c"),
                               atol=0.01, rtol=0)


def test_previews_that_cost_too_much_get_coarser_and_rarer(prior, vq, monkeypatch):
    # a decode costs 0.12 s, half of a 0.25 s step: each preview halves the resolution of the
    # next, and the next comes only 10x its cost later (1.2 s: steps 1, 6, 11 of 12)
    decoded, _ = _timed_preview_run(prior, vq, monkeypatch, 0.12, steps=12)
    assert [d[1] for d in decoded] == [7, 4, 2]
    # 0.32 s per decode: 3.2 s apart (steps 1 and 14 of 16; the 1 s interval alone gives 4)
    decoded, _ = _timed_preview_run(prior, vq, monkeypatch, 0.32, steps=16)
    assert [d[1] for d in decoded] == [7, 4]


@pytest.mark.parametrize("error", [RuntimeError(CPU_OOM), torch.OutOfMemoryError("CUDA out of memory (fake)")])
def test_out_of_memory_in_a_preview_skips_previews_not_the_run(prior, vq, monkeypatch, error, caplog):
    calls = []

    def oom(tokens, **k):
        calls.append(1)
        raise error

    monkeypatch.setattr(vq.model, "decode", oom)
    expected = run_sampler(prior, steps=6)
    with caplog.at_level("WARNING"):
        out = run_sampler(prior, steps=6, vqgan=vq)
    assert torch.equal(out.tokens, expected.tokens)  # the run completed, same tokens
    assert calls == [1], "after one out-of-memory error no further preview is tried"
    assert sum("previews are off" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(vq.model, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):  # other errors are not hidden
        run_sampler(prior, steps=2, vqgan=vq)


def test_nodes_keep_no_state_and_inputs_stay_untouched(prior, vq):
    before = {k: v.clone() for k, v in prior.model.state_dict().items()}
    tokens = encode(vq, torch.rand(1, 28, 28, 3))
    kept = tokens.tokens.clone()
    class_dicts = {name: dict(vars(cls)) for name, cls in NODE_CLASS_MAPPINGS.items()}
    sampler = Sampler()
    with torch.inference_mode():
        sampler.run(prior, 0, 3, 1.0, 0.7, 1.0, 1.0, False, 2, 1, 1.5, 0.5, 0, 0, tokens=tokens, vqgan=vq)
    assert vars(sampler) == {}
    assert torch.equal(tokens.tokens, kept)
    assert all(torch.equal(v, prior.model.state_dict()[k]) for k, v in before.items())
    assert {name: dict(vars(cls)) for name, cls in NODE_CLASS_MAPPINGS.items()} == class_dicts
    with pytest.raises(dataclasses.FrozenInstanceError):
        tokens.mask = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        prior.model = None


def test_token_batch_validates():
    with pytest.raises(ValueError, match="int64"):
        TokenBatch(torch.zeros(1, 2, 2), None, 4)
    three = torch.zeros(3, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"bool tensor \[m, h, w\] over the tokens' grid \(2, 2\)"):
        TokenBatch(three, torch.zeros(1, 3, 3, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="m dividing their batch 3"):
        TokenBatch(three, torch.zeros(2, 2, 2, dtype=torch.bool), 4)
    assert TokenBatch(three, torch.zeros(1, 2, 2, dtype=torch.bool), 4).mask.shape == (1, 2, 2)
