"""The inpainting mask's path: one pixel -> token conversion (pixel codecs with interleaved
channels included), one broadcast to the sample batch (in ``sample()``), one empty-mask shortcut.
Expectations are written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_sundae import sundae_lib
from comfyui_sundae.sundae_lib import PriorConfig, SundaePrior, sample, save_prior
from comfyui_sundae.sundae_lib.masks import token_mask_from_pixels
from comfyui_sundae.trainer import sample_cmd
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_prior() -> SundaePrior:
    torch.manual_seed(0)
    return SundaePrior(PriorConfig.preset("tiny")).eval()


def test_pixel_codec_channels_share_their_pixels_decision():
    m = torch.zeros(2, 2)
    m[0, 0] = 1.0
    got = token_mask_from_pixels(m, factor=1, grid=(2, 6), channels=3)
    want = torch.tensor([[[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]], dtype=torch.bool)
    assert torch.equal(got, want)
    # grow is measured in pixels, then every channel follows its pixel
    assert token_mask_from_pixels(m, factor=1, grid=(2, 6), channels=3, grow=1).all()
    with pytest.raises(ValueError, match="channels=3 needs factor 1"):
        token_mask_from_pixels(m, factor=4, grid=(2, 6), channels=3)


def test_cli_inpaint_with_an_rgb_pixel_codec_masks_whole_pixels(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "rgb.safetensors"
    save_prior(SundaePrior(PriorConfig.preset("tiny", grid=(4, 12))), path,
               metadata={"sundae.codec": "pixel:levels=16,channels=3"})
    Image.fromarray(np.full((4, 4, 3), 100, dtype=np.uint8)).save(tmp_path / "x.png")
    seen = {}

    def spy(prior, **kw):
        seen.update(kw)
        return kw["init_tokens"].expand(kw["batch_size"], -1, -1).clone()

    monkeypatch.setattr(sundae_lib, "sample", spy)
    sample_cmd.run_inpaint(image=str(tmp_path / "x.png"), mask=None, box="1,0,2,1", rule="any", grow=0, resize=0,
                           composite=True, num=1, out=str(tmp_path / "o.png"), model=str(path), vqgan=None, seed=0,
                           steps=1, temperature=None, update_proportion=None, min_steps=None, early_stop=None,
                           klass=None, cfg_scale=None, batch_size=1, device="cpu")
    want = torch.zeros(1, 4, 12, dtype=torch.bool)
    want[0, 0, 3:9] = True  # pixels x = 1, 2 of row 0: tokens 3..8 (three channels each)
    assert torch.equal(seen["mask"].cpu(), want)


def test_each_init_grid_keeps_its_own_tokens_under_its_own_mask():
    """init [2, h, w] with batch_size 4 and a mask per grid: sample() spreads both (grid i
    serves samples 2i, 2i + 1), keeps every sample's unmasked tokens and fills its hole."""
    prior = tiny_prior()
    init = torch.randint(0, 16, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, :4] = True  # grid 0: top half
    mask[1, :, :4] = True  # grid 1: left half
    out = sample(prior, init_tokens=init, mask=mask, batch_size=4, steps=3,
                 generator=torch.Generator().manual_seed(2))
    assert out.shape == (4, 8, 8)
    for i in range(4):
        g = i // 2
        assert torch.equal(out[i][~mask[g]], init[g][~mask[g]])
        assert not torch.equal(out[i][mask[g]], init[g][mask[g]])
    # one mask for all, and one mask per sample, are the same rule
    one = sample(prior, init_tokens=init, mask=mask[:1], batch_size=4, steps=3,
                 generator=torch.Generator().manual_seed(2))
    per_sample = sample(prior, init_tokens=init, mask=mask[:1].expand(4, 8, 8), batch_size=4, steps=3,
                        generator=torch.Generator().manual_seed(2))
    assert torch.equal(one, per_sample)
    with pytest.raises(ValueError, match=r"mask shape \(3, 8, 8\) does not match the tokens \[4, 8, 8\]"):
        sample(prior, init_tokens=init, mask=torch.ones(3, 8, 8, dtype=torch.bool), batch_size=4)


def test_the_empty_mask_shortcut_returns_every_sample_without_a_forward(monkeypatch):
    prior = tiny_prior()

    def boom(*a, **k):
        raise AssertionError("the prior must not run for an empty mask")

    monkeypatch.setattr(prior, "forward", boom)
    init = torch.randint(0, 16, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    out = sample(prior, init_tokens=init, mask=torch.zeros(8, 8, dtype=torch.bool), batch_size=6,
                 callback=lambda *a: (_ for _ in ()).throw(AssertionError("no callback")))
    assert torch.equal(out, init.repeat_interleave(3, dim=0))


def test_a_mask_serves_whole_init_grids():
    """init [2] -> 6 samples (3 per grid): a mask batch must divide the 2 init grids (or be one
    per sample); 3 masks would give grid 0's samples two different masks."""
    prior = tiny_prior()
    init = torch.randint(0, prior.codebook_size, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    top = torch.zeros(8, 8, dtype=torch.bool)
    top[:4] = True
    kw = dict(init_tokens=init, batch_size=6, steps=2, early_stop=False, temperature=1.0,
              update_proportion=1.0, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="m dividing 2"):
        sample(prior, mask=top.expand(3, 8, 8), **kw)
    two = torch.stack([top, ~top])  # grid 0: regenerate the top, grid 1: the bottom
    out = sample(prior, mask=two, **kw)
    assert torch.equal(out[:3, 4:], init[:1, 4:].expand(3, 4, 8))  # grid 0's kept bottom
    assert torch.equal(out[3:, :4], init[1:, :4].expand(3, 4, 8))  # grid 1's kept top
    assert sample(prior, mask=top.expand(6, 8, 8), **kw).shape == (6, 8, 8)


def test_cli_class_auto_keeps_the_guessed_id(tmp_path, monkeypatch):
    """--class auto picks class *id* 1; with the label map ["1", "0"] its name is "0". Passed on
    as the string "1", the name would win and sample class id 0."""
    torch.manual_seed(0)
    path = tmp_path / "p.safetensors"
    save_prior(SundaePrior(PriorConfig.preset("tiny", grid=(4, 4), num_classes=2)), path,
               metadata={"sundae.codec": "pixel:levels=16,channels=1", "sundae.label_map": '["1", "0"]'})
    Image.fromarray(np.full((4, 4), 100, dtype=np.uint8)).save(tmp_path / "x.png")
    seen = {}

    def spy(prior, **kw):
        seen.update(kw)
        return kw["init_tokens"].expand(kw["batch_size"], -1, -1).clone()

    monkeypatch.setattr(sample_cmd, "guess_class", lambda prior, tokens, mask, seed=0: (1, [0.0, 1.0]))
    monkeypatch.setattr(sundae_lib, "sample", spy)
    sample_cmd.run_inpaint(image=str(tmp_path / "x.png"), mask=None, box="0,2,4,2", rule="any", grow=0, resize=0,
                           composite=True, num=2, out=str(tmp_path / "o.png"), model=str(path), vqgan=None, seed=0,
                           steps=1, temperature=None, update_proportion=None, min_steps=None, early_stop=None,
                           klass=None, cfg_scale=None, batch_size=2, device="cpu")
    assert seen["labels"].tolist() == [1, 1]
