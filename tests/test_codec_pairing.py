"""A prior records its codec (``sundae.codec``); a VQ-GAN with the same codebook size but
another factor or channel count must not be accepted silently (issue #13 item 2). One parser
(``CodecSpec``) serves the loaders, the sampler node and the CLI."""

from __future__ import annotations

import logging

import pytest
import torch
from comfyui_sundae.sundae_lib import (
    VQGAN,
    PixelCodec,
    VQGANConfig,
    load_prior,
    save_prior,
    save_vqgan,
)
from comfyui_sundae.sundae_lib._helpers import file_sha256
from comfyui_sundae.sundae_lib.codec_spec import CodecSpec, check_codec_pairing
from comfyui_sundae.trainer import sample_cmd
from conftest import small_vqgan, tiny_prior


def test_spec_parses_what_every_writer_wrote_and_round_trips():
    s = CodecSpec.parse("vqgan:sha256=ab12,factor=4")
    assert (s.kind, s.sha256, s.factor, s.channels, s.file) == ("vqgan", "ab12", 4, None, None)
    assert str(s) == "vqgan:sha256=ab12,factor=4"
    s = CodecSpec.parse("vqgan:sha256=ab12,factor=16,channels=3")
    assert str(s) == "vqgan:sha256=ab12,factor=16,channels=3" and s.channels == 3
    assert CodecSpec.parse("vqgan:file=x.safetensors,factor=8").file == "x.safetensors"
    assert CodecSpec.parse("vqgan:f=8").factor == 8  # early writers
    p = CodecSpec.parse("pixel:levels=16,channels=1")
    assert (p.kind, p.factor, p.levels, p.channels) == ("pixel", 1, 16, 1) and str(p) == "pixel:levels=16,channels=1"
    assert CodecSpec.parse(" pixel ") == CodecSpec.parse("pixel:channels=1,levels=256")
    assert str(CodecSpec.parse("vqgan:factor=4,future=yes")) == "vqgan:factor=4,future=yes"  # kept
    for codec in (PixelCodec(16, 3), VQGAN(VQGANConfig.preset("tiny"))):
        spec = CodecSpec.of_codec(codec, sha256="cd")
        assert CodecSpec.parse(str(spec)) == spec
    meta = {"sundae.codec": "vqgan:sha256=ab,factor=4", "sundae.vqgan_file": "vq.safetensors"}
    assert CodecSpec.from_metadata(meta).file == "vq.safetensors"
    assert CodecSpec.from_metadata({}) is None


@pytest.mark.parametrize(("text", "match"), [
    ("", "non-empty"), ("factor=4", "codec kind"), ("vqgan:factor", "bad item 'factor'"),
    ("vqgan:factor=four", "factor must be an integer"), ("vqgan:factor=4,factor=4", "factor given twice"),
    ("pixel:factor=2", "pixel codec has factor 1"),
])
def test_spec_errors(text, match):
    with pytest.raises(ValueError, match=match):
        CodecSpec.parse(text)


def test_pairing_rules():
    vq2 = VQGAN(VQGANConfig.preset("tiny"))  # f2, 3 channels
    spec4 = CodecSpec.parse("vqgan:sha256=aa,factor=4,channels=3")
    with pytest.raises(ValueError, match=r"prior 'p\.safetensors' .* factor-4 VQ-GAN .* codec 'vq2\.safetensors' does "
                                         r"not fit: its factor is 2, the prior's is 4"):
        check_codec_pairing(spec4, vq2, prior_name="p.safetensors", codec_name="vq2.safetensors")
    with pytest.raises(ValueError, match="it has 3 channels, the prior's codec 1"):
        check_codec_pairing(CodecSpec.parse("vqgan:factor=2,channels=1"), vq2, prior_name="p", codec_name="v")
    with pytest.raises(ValueError, match="it is a VQ-GAN; its factor is 2, the prior's is 1"):
        check_codec_pairing(CodecSpec.parse("pixel:levels=32,channels=3"), vq2, prior_name="p", codec_name="v")
    with pytest.raises(ValueError, match="it has 1 channels, the prior's codec 3 — load 'pixels \\(16 levels, RGB\\)'"):
        check_codec_pairing(CodecSpec.parse("pixel:levels=16,channels=3"), PixelCodec(16, 1), prior_name="p",
                            codec_name="pixels (16 levels, grey)")
    same = CodecSpec.parse("vqgan:sha256=aa,factor=2,channels=3")
    assert check_codec_pairing(same, vq2, prior_name="p", codec_name="v", codec_sha256="aa") == []
    assert check_codec_pairing(CodecSpec.parse("vqgan:factor=2"), vq2, prior_name="p", codec_name="v") == []
    assert check_codec_pairing(None, vq2, prior_name="p", codec_name="v") == []  # old priors record nothing
    (warning,) = check_codec_pairing(same, vq2, prior_name="p", codec_name="v", codec_sha256="bb")
    assert "is not the file prior 'p' was trained on" in warning and "fine-tuned" in warning


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A factor-4 grey VQ-GAN with 256 codes, its prior, and a factor-2 grey VQ-GAN with 256 codes."""
    root = tmp_path_factory.mktemp("codecs")
    vq4 = root / "vq4.safetensors"
    save_vqgan(small_vqgan(seed=0), vq4)
    vq2 = root / "vq2.safetensors"
    save_vqgan(VQGAN(VQGANConfig.preset("tiny", n_embed=256, in_channels=1, out_ch=1)), vq2)
    prior = root / "prior.safetensors"
    save_prior(tiny_prior(seed=None, codebook_size=256, grid=(7, 7)), prior, metadata={
        "sundae.codec": str(CodecSpec(kind="vqgan", sha256=file_sha256(vq4), factor=4, channels=1)),
        "sundae.vqgan_file": "vq4.safetensors"})
    return root, vq4, vq2, prior


def test_cli_refuses_a_vqgan_of_another_factor_naming_both_files(files, caplog):
    root, vq4, vq2, prior_path = files
    prior = load_prior(str(prior_path))
    with pytest.raises(ValueError) as err:
        sample_cmd.resolve_codec(prior, str(prior_path), str(vq2))
    msg = str(err.value)
    assert str(prior_path) in msg and str(vq2) in msg and "'vq4.safetensors'" in msg
    assert "its factor is 2, the prior's is 4" in msg
    # the recorded VQ-GAN, found beside the prior: fine, no warning
    with caplog.at_level(logging.WARNING):
        assert sample_cmd.resolve_codec(prior, str(prior_path), None).downsample_factor == 4
        assert sample_cmd.resolve_codec(prior, str(prior_path), str(vq4)).downsample_factor == 4
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_cli_warns_about_a_fine_tuned_vqgan(files, tmp_path, caplog):
    root, vq4, vq2, prior_path = files
    tuned = small_vqgan(seed=None)
    with torch.no_grad():
        tuned.quantize.embedding.weight.add_(0.01)
    save_vqgan(tuned, tmp_path / "tuned.safetensors")
    with caplog.at_level(logging.WARNING):
        codec = sample_cmd.resolve_codec(load_prior(str(prior_path)), str(prior_path), str(tmp_path / "tuned.safetensors"))
    assert codec.downsample_factor == 4
    assert "is not the file prior" in caplog.text and "tuned.safetensors" in caplog.text and "fine-tuned" in caplog.text
