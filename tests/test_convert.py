"""``sundae-train convert``: half-precision shipped files load as the same fp32 models (weights
rounded, nothing else changed), and a prior is re-pointed at the converted VQ-GAN."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from comfyui_sundae.sundae_lib import (
    VQGAN,
    CodecSpec,
    PriorConfig,
    SundaePrior,
    VQGANConfig,
    load_prior,
    load_vqgan,
    save_prior,
    save_vqgan,
)
from comfyui_sundae.sundae_lib._helpers import file_sha256
from comfyui_sundae.trainer.cli import main
from safetensors import safe_open


def _dtypes(path):
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}, f.metadata()


def test_convert_vqgan_and_prior_to_fp16(tmp_path):
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("tiny"))
    save_vqgan(vq, tmp_path / "vq.safetensors", extra_metadata={"sundae.label_map": '["a"]'})
    prior = SundaePrior(PriorConfig.preset("tiny", codebook_size=vq.codebook_size, num_classes=2))
    save_prior(prior, tmp_path / "prior.safetensors", metadata={
        "sundae.codec": f"vqgan:sha256={file_sha256(tmp_path / 'vq.safetensors')},factor=2",
        "sundae.vqgan_file": "vq.safetensors", "sundae.vqgan_source": "/home/someone/vq.safetensors",
        "sundae.sampling": json.dumps({"steps": 9})})

    r = CliRunner().invoke(main, ["convert", str(tmp_path / "vq.safetensors"), str(tmp_path / "vq16.safetensors")])
    assert r.exit_code == 0, r.output
    dtypes, meta = _dtypes(tmp_path / "vq16.safetensors")
    assert dtypes == {torch.float16} and meta["sundae.label_map"] == '["a"]'
    assert (tmp_path / "vq16.safetensors").stat().st_size < 0.6 * (tmp_path / "vq.safetensors").stat().st_size
    vq16 = load_vqgan(str(tmp_path / "vq16.safetensors"))
    for k, v in vq.state_dict().items():
        got = vq16.state_dict()[k]
        assert got.dtype == torch.float32 and torch.equal(got, v.half().float()), k

    r = CliRunner().invoke(main, ["convert", str(tmp_path / "prior.safetensors"), str(tmp_path / "p16.safetensors"),
                                  "--vqgan", str(tmp_path / "vq16.safetensors")])
    assert r.exit_code == 0, r.output
    dtypes, meta = _dtypes(tmp_path / "p16.safetensors")
    assert dtypes == {torch.float16}
    assert CodecSpec.parse(meta["sundae.codec"]) == CodecSpec(
        kind="vqgan", sha256=file_sha256(tmp_path / "vq16.safetensors"), factor=2, channels=vq.in_channels)
    assert meta["sundae.vqgan_file"] == "vq16.safetensors"
    assert "sundae.vqgan_source" not in meta  # no machine path survives
    assert json.loads(meta["sundae.sampling"]) == {"steps": 9}
    p16 = load_prior(str(tmp_path / "p16.safetensors"))
    x = torch.randint(0, vq.codebook_size, (2, 8, 8))
    with torch.no_grad():
        a, b = prior(x, torch.tensor([0, 1])), p16(x, torch.tensor([0, 1]))
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05


def test_convert_refuses_bad_input(tmp_path):
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("tiny"))
    save_vqgan(vq, tmp_path / "vq.safetensors")
    prior = SundaePrior(PriorConfig.preset("tiny", codebook_size=7))
    save_prior(prior, tmp_path / "prior.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    cases = [
        ["convert", str(tmp_path / "vq.safetensors"), str(tmp_path / "vq.safetensors")],
        ["convert", str(tmp_path / "vq.safetensors"), str(tmp_path / "o.safetensors"), "--vqgan", str(tmp_path / "vq.safetensors")],
        ["convert", str(tmp_path / "prior.safetensors"), str(tmp_path / "o.safetensors"), "--vqgan", str(tmp_path / "vq.safetensors")],
        ["convert", str(tmp_path / "junk.safetensors"), str(tmp_path / "o.safetensors")],
    ]
    for args in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code != 0 and "Error" in r.output and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "o.safetensors").exists()
