"""The loader nodes without ComfyUI: model dropdowns (files, diffusers folders, pixel codecs),
loading VQ-GANs, pixel codecs and priors with their codec metadata, IS_CHANGED, the auto dtype,
and the sampler's codec pairing of loaded files.

Model folders are temporary folders given to ``nodes.comfy_adapter``'s fallback lookup.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_sundae.nodes import NODE_CLASS_MAPPINGS, comfy_adapter, loaders
from comfyui_sundae.nodes.types import CodecHandle, PriorHandle
from comfyui_sundae.sundae_lib import (
    VQGAN,
    VQGANConfig,
    save_prior,
    save_vqgan,
)
from conftest import CPU, run_sampler, small_vqgan, tiny_prior

Encode = NODE_CLASS_MAPPINGS["SundaeEncode"]
LoadVQGAN, LoadPrior = NODE_CLASS_MAPPINGS["SundaeLoadVQGAN"], NODE_CLASS_MAPPINGS["SundaeLoadPrior"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------


@pytest.fixture
def model_dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_adapter, "_fallback_folders", {"vqgan": [str(tmp_path / "vqgan")],
                                                             "sundae": [str(tmp_path / "sundae")]})
    (tmp_path / "vqgan").mkdir()
    (tmp_path / "sundae").mkdir()
    return tmp_path


def test_vqgan_dropdown_lists_files_diffusers_folders_and_pixel_codecs(model_dirs):
    save_vqgan(VQGAN(VQGANConfig.preset("tiny")), model_dirs / "vqgan" / "tiny.safetensors")
    dvq = model_dirs / "vqgan" / "my-vqmodel"
    dvq.mkdir()
    (dvq / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    (dvq / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    other = model_dirs / "vqgan" / "sub"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (other / "x.ckpt").write_bytes(b"")
    (model_dirs / "vqgan" / "notes.txt").write_text("not a model")
    names = LoadVQGAN.INPUT_TYPES()["required"]["vqgan_name"][0]
    assert names[:3] == ["my-vqmodel/", "sub/x.ckpt", "tiny.safetensors"]
    assert names[3:] == [f"pixels ({n} levels, grey)" for n in (256, 128, 64, 32, 16, 8, 4, 2)]
    assert comfy_adapter.resolve_model_path("vqgan", "my-vqmodel/") == dvq


def test_load_vqgan_file_and_pixel_codec(model_dirs):
    save_vqgan(VQGAN(VQGANConfig.preset("tiny")), model_dirs / "vqgan" / "tiny.safetensors")
    (h,) = LoadVQGAN().load("tiny.safetensors", "auto")
    assert isinstance(h, CodecHandle) and h.factor == 2 and h.codebook_size == 32 and h.dtype == torch.float32
    assert not any(p.requires_grad for p in h.model.parameters()) and not h.model.training
    (h16,) = LoadVQGAN().load("pixels (16 levels, grey)", "bf16")
    assert h16.codebook_size == 16 and h16.factor == 1 and h16.in_channels == 1
    assert h16.dtype == torch.float32  # pixel codecs stay exact
    (hb,) = LoadVQGAN().load("tiny.safetensors", "bf16")
    assert next(hb.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="'missing.safetensors' was not found in the 'vqgan' model folders"):
        LoadVQGAN().load("missing.safetensors", "auto")


def test_is_changed_follows_the_file(model_dirs):
    path = model_dirs / "sundae" / "p.safetensors"
    model = tiny_prior(seed=None, codebook_size=16, grid=(4, 4))
    save_prior(model, path, metadata={"sundae.codec": "pixel:levels=16,channels=1"})
    first = LoadPrior.IS_CHANGED("p.safetensors", "auto")
    assert first == LoadPrior.IS_CHANGED("p.safetensors", "auto")
    save_prior(tiny_prior(seed=None, codebook_size=16, grid=(4, 4), num_classes=3), path)
    assert LoadPrior.IS_CHANGED("p.safetensors", "auto") != first
    assert LoadPrior.IS_CHANGED("p.safetensors", "fp32") != LoadPrior.IS_CHANGED("p.safetensors", "auto")
    assert LoadVQGAN.IS_CHANGED("pixels (8 levels, grey)", "auto") == LoadVQGAN.IS_CHANGED("pixels (8 levels, grey)", "auto")


def test_load_prior_reads_codec_metadata(model_dirs):
    model = tiny_prior(seed=None, codebook_size=16, grid=(4, 4), num_classes=3)
    save_prior(model, model_dirs / "sundae" / "pix.safetensors", metadata={"sundae.codec": "pixel:levels=16,channels=1"})
    assert LoadPrior.INPUT_TYPES()["required"]["prior_name"][0] == ["pix.safetensors"]
    (h,) = LoadPrior().load("pix.safetensors", "fp32")
    assert isinstance(h, PriorHandle) and h.codebook_size == 16 and h.factor == 1
    assert h.codec == "pixel:levels=16,channels=1"
    assert loaders.factor_from_codec_metadata("vqgan:file=x.safetensors,factor=8") == 8
    assert loaders.factor_from_codec_metadata("vqgan:file=x.safetensors") is None
    assert loaders.factor_from_codec_metadata(None) is None


def test_auto_dtype_is_fp32_on_cpu():
    assert comfy_adapter.pick_dtype("auto", CPU) == torch.float32
    assert comfy_adapter.pick_dtype("fp16", CPU) == torch.float16
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        comfy_adapter.pick_dtype("fp8", CPU)


def test_load_diffusers_vqmodel_folder(model_dirs):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=4, num_vq_embeddings=24, vq_embed_dim=4, norm_num_groups=4,
        sample_size=16,
    )
    model.save_pretrained(model_dirs / "vqgan" / "tiny-diffusers")
    names = LoadVQGAN.INPUT_TYPES()["required"]["vqgan_name"][0]
    assert "tiny-diffusers/" in names and not any(n.startswith("tiny-diffusers/diffusion") for n in names)
    (h,) = LoadVQGAN().load("tiny-diffusers/", "auto")
    assert h.codebook_size == 24 and h.factor == 2
    with torch.inference_mode():
        (tb,) = Encode().encode(h, torch.rand(1, 16, 16, 3))
    assert tb.grid == (8, 8) and int(tb.tokens.max()) < 24


def test_codec_pairing_factor_mismatch_is_an_error_and_another_sha256_a_warning(model_dirs, caplog):
    """Same codebook size is not enough (issue #13 item 2): a factor-2 VQ-GAN with a prior of a
    factor-4 one used to sample and decode without a word."""
    from comfyui_sundae.sundae_lib._helpers import file_sha256

    vq4 = small_vqgan(seed=None)
    save_vqgan(vq4, model_dirs / "vqgan" / "vq4.safetensors")
    save_vqgan(VQGAN(VQGANConfig.preset("tiny", n_embed=256, in_channels=1, out_ch=1)),
               model_dirs / "vqgan" / "vq2.safetensors")
    with torch.no_grad():
        vq4.quantize.embedding.weight.add_(0.01)
    save_vqgan(vq4, model_dirs / "vqgan" / "vq4-tuned.safetensors")
    sha = file_sha256(model_dirs / "vqgan" / "vq4.safetensors")
    save_prior(tiny_prior(seed=None, codebook_size=256, grid=(7, 7)), model_dirs / "sundae" / "p.safetensors",
               metadata={"sundae.codec": f"vqgan:sha256={sha},factor=4,channels=1", "sundae.vqgan_file": "vq4.safetensors"})
    (prior,) = LoadPrior().load("p.safetensors", "fp32")
    assert prior.factor == 4
    vq2, vq4h, tuned = (LoadVQGAN().load(n, "fp32")[0] for n in ("vq2.safetensors", "vq4.safetensors", "vq4-tuned.safetensors"))
    assert vq2.codebook_size == prior.codebook_size == 256
    with pytest.raises(ValueError) as err:
        run_sampler(prior, vqgan=vq2)
    msg = str(err.value)
    assert msg.startswith("SundaeSampler: prior 'p.safetensors' was trained on tokens of a factor-4 VQ-GAN (grey) "
                          "'vq4.safetensors', but the codec 'vq2.safetensors' does not fit: its factor is 2")
    assert msg.endswith("— load 'vq4.safetensors'")
    with caplog.at_level("WARNING"):
        assert run_sampler(prior, vqgan=vq4h).factor == 4
        assert "not the file" not in caplog.text
        assert run_sampler(prior, vqgan=tuned).grid == (7, 7)  # a fine-tuned VQ-GAN: allowed, with a warning
    assert "SundaeSampler: the VQ-GAN 'vq4-tuned.safetensors' is not the file prior 'p.safetensors' was trained on" in caplog.text


def test_load_prior_torch_compile_option(model_dirs, monkeypatch):
    """torch_compile wraps the placed prior in compile_prior (here with a stand-in torch.compile:
    the real one is tested in test_compiled.py) and the sampler gives the same tokens."""
    from comfyui_sundae.sundae_lib import compiled

    compiled_calls = []

    def fake_compile(model, **kw):
        compiled_calls.append(kw)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(compiled, "cpu_compiler", lambda: "/usr/bin/c++")
    save_prior(tiny_prior(seed=0), model_dirs / "sundae" / "t.safetensors")
    (plain,) = LoadPrior().load("t.safetensors", "fp32")
    (fast,) = LoadPrior().load("t.safetensors", "fp32", torch_compile=True)
    assert isinstance(fast.model, compiled.CompiledPrior) and not isinstance(plain.model, compiled.CompiledPrior)
    assert len(compiled_calls) == 1 and fast.model.freezing
    assert fast.codebook_size == plain.codebook_size
    assert LoadPrior.IS_CHANGED("t.safetensors", "fp32", True) != LoadPrior.IS_CHANGED("t.safetensors", "fp32")
    assert torch.equal(run_sampler(fast).tokens, run_sampler(plain).tokens)
    monkeypatch.setattr(compiled, "cpu_compiler", lambda: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        LoadPrior().load("t.safetensors", "fp32", torch_compile=True)
