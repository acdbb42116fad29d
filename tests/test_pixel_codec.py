"""PixelCodec: the pixel-level "codec" of pixel priors (tokens = grey levels per channel)."""

from __future__ import annotations

import pytest
import torch
from comfyui_sundae.sundae_lib.vqgan import PixelCodec, PixelCodecConfig


def test_pixel_codec_round_trip_on_real_digits(mnist):
    images, _ = mnist
    u8 = torch.from_numpy(images[:16]).long()
    codec = PixelCodec(256, 1)
    x = (u8.float() / 127.5 - 1)[:, None]
    tokens = codec.encode(x)
    assert torch.equal(tokens, u8)  # 256 levels: tokens are the uint8 values
    assert torch.equal(codec.encode(codec.decode(tokens)), tokens)
    coarse = PixelCodec(levels=4)
    t4 = coarse.encode(x)
    assert set(t4.unique().tolist()) <= {0, 1, 2, 3}
    torch.testing.assert_close(coarse.decode(t4), t4[:, None].float() / 3 * 2 - 1)
    assert torch.equal(coarse.encode(coarse.decode(t4)), t4)
    assert (codec.downsample_factor, codec.codebook_size, codec.in_channels) == (1, 256, 1)


def test_pixel_codec_channel_layout_and_spec():
    codec = PixelCodec.from_spec("pixel:levels=3,channels=3")
    assert codec.spec == "pixel:levels=3,channels=3" and codec.config == PixelCodecConfig(3, 3)
    x = torch.full((1, 3, 2, 2), -1.0)
    x[0, 1, 0, 1] = 0.0  # pixel (0, 1), green -> level 1
    x[0, 2, 1, 0] = 1.0  # pixel (1, 0), blue -> level 2
    tokens = codec.encode(x)
    assert tokens.tolist() == [[[0, 0, 0, 0, 1, 0], [0, 0, 2, 0, 0, 0]]]
    assert codec.token_grid(2, 2) == (2, 6) and codec.image_size(2, 6) == (2, 2)
    assert torch.equal(codec.decode(tokens), x)
    assert PixelCodec.from_spec("pixel").spec == "pixel:levels=256,channels=1"
    assert PixelCodec.from_spec(" pixel: channels=1 , levels=16 ").levels == 16
    for bad, message in [
        ("vq:levels=3", "not a pixel codec spec"),
        ("pixel:levels=x", "levels must be an integer"),
        ("pixel:depth=3", "valid keys"),
        ("pixel:levels=1", r"levels must be an integer in \[2, 65536\]"),
        ("pixel:levels=4,levels=5", "given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            PixelCodec.from_spec(bad)
    with pytest.raises(ValueError, match="not a multiple of channels=3"):
        codec.decode(torch.zeros(1, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="3 codes"):
        codec.decode(torch.full((1, 2, 3), 3))
    with pytest.raises(ValueError, match="3-channel images but got 1"):
        codec.encode(torch.zeros(1, 1, 2, 2))
