"""``sundae-train record-sampling``: the measured best settings go into a prior file's metadata,
the weights stay bit-identical, bad values are refused, and sampling then uses them."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from comfyui_sundae.sundae_lib import load_prior, save_prior
from comfyui_sundae.trainer.cli import main
from conftest import tiny_prior
from safetensors import safe_open
from safetensors.torch import load_file


def _prior_file(tmp_path):
    prior = tiny_prior(seed=0, num_classes=3)
    path = tmp_path / "prior.safetensors"
    recorded = {"num_samples": 4, "steps": 50, "temperature": [1.0, 0.7], "update_proportion": [1.0, 1.0],
                "early_stop": True, "min_steps": 10, "cfg_scale": 1.0, "seed": 0}
    save_prior(prior, path, metadata={"sundae.sampling": json.dumps(recorded), "sundae.label_map": '["a", "b", "c"]'})
    return path, recorded


def _recorded(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["sundae.sampling"]), f.metadata()


def test_record_sampling_changes_only_the_given_settings(tmp_path):
    path, before = _prior_file(tmp_path)
    weights = load_file(str(path))
    res = CliRunner().invoke(main, ["record-sampling", str(path), "--steps", "25", "--cfg", "3",
                                    "-t", "1.0,0.5", "-p", "0.8"])
    assert res.exit_code == 0, res.output
    after, meta = _recorded(path)
    assert after["steps"] == 25 and after["cfg_scale"] == 3.0
    assert after["temperature"] == [1.0, 0.5] and after["update_proportion"] == [0.8, 0.8]
    for key in ("num_samples", "early_stop", "min_steps", "seed"):
        assert after[key] == before[key]
    assert meta["sundae.label_map"] == '["a", "b", "c"]'  # other metadata kept
    new = load_file(str(path))
    assert new.keys() == weights.keys() and all(torch.equal(new[k], weights[k]) for k in new)
    assert '"steps": 50' in res.output and '"steps": 25' in res.output


def test_record_sampling_without_options_prints_and_keeps_the_file(tmp_path):
    path, before = _prior_file(tmp_path)
    data = path.read_bytes()
    res = CliRunner().invoke(main, ["record-sampling", str(path)])
    assert res.exit_code == 0 and '"steps": 50' in res.output
    assert path.read_bytes() == data


def test_record_sampling_refuses_bad_values_and_keeps_the_file(tmp_path):
    path, _ = _prior_file(tmp_path)
    data = path.read_bytes()
    for args in (["--steps", "0"], ["-t", "0,1"], ["-p", "1.5"], ["-t", "a,b"]):
        res = CliRunner().invoke(main, ["record-sampling", str(path), *args])
        assert res.exit_code != 0, args
        assert "Traceback" not in res.output and "Error" in res.output, res.output
    assert path.read_bytes() == data


def test_recorded_settings_reach_the_loaded_prior(tmp_path):
    path, _ = _prior_file(tmp_path)
    CliRunner().invoke(main, ["record-sampling", str(path), "--steps", "7", "--cfg", "2.5"])
    prior = load_prior(path)
    recorded = json.loads(prior.metadata["sundae.sampling"])
    assert recorded["steps"] == 7 and recorded["cfg_scale"] == 2.5


def test_loaders_take_shipped_names():
    from comfyui_sundae.sundae_lib import load_vqgan
    from comfyui_sundae.sundae_lib._helpers import shipped_names

    assert {"mnist-vq", "mnist-pixels", "emoji"} <= set(shipped_names("sundae"))
    prior = load_prior("emoji")
    assert prior.num_classes == 9 and tuple(prior.config.grid) == (16, 16)
    vq = load_vqgan("emoji-vq")
    assert vq.downsample_factor == 4 and vq.codebook_size == prior.codebook_size
    try:
        load_prior("no-such-model")
    except (FileNotFoundError, ValueError) as exc:
        assert "no-such-model" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("an unknown name must be refused")


def test_shipped_models_record_no_machine_paths():
    """Shipped metadata must mean the same on every machine: no absolute or home paths."""
    from comfyui_sundae.sundae_lib._helpers import SHIPPED_DIR

    files = sorted(SHIPPED_DIR.glob("*/*.safetensors"))
    assert len(files) >= 5
    for path in files:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        for key, value in meta.items():
            assert not any(p in value for p in ("/work/", "/home/", "/root/", "/tmp/", ":\\")), (path.name, key, value)
