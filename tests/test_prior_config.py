"""PriorConfig and prior files: presets against the paper's parameter counts, overrides,
strict JSON round trips and validation messages; native save / load (bit-identical, strict key
checks, other model types, offline ``hf://``, plain state dicts).
"""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_sundae.sundae_lib import PriorConfig, SundaePrior, load_prior, save_prior
from comfyui_sundae.sundae_lib._helpers import load_safetensors, save_native
from conftest import TWO_LEVELS, tiny_prior

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, paper_millions",
    [("ffhq256", 178.4), ("ffhq1024", 214.1), ("imagenet256", 200.4), ("mnist-pixels", 155.9)],
)
def test_paper_presets_match_the_paper_parameter_counts(name, paper_millions):
    config = PriorConfig.preset(name)
    with torch.device("meta"):
        prior = SundaePrior(config)
    assert abs(prior.num_parameters() / 1e6 - paper_millions) / paper_millions < 0.005


def test_presets_and_overrides():
    assert {"ffhq256", "ffhq1024", "imagenet256", "mnist-pixels", "small", "tiny"} <= set(
        PriorConfig.preset_names()
    )
    c = PriorConfig.preset("ffhq1024")
    assert (c.grid, c.codebook_size, c.dim, c.heads, c.depth) == ((32, 32), 8192, 1024, 8, (2, 12, 2))
    assert PriorConfig.preset("imagenet256").num_classes == 1000
    m = PriorConfig.preset("mnist-pixels")
    assert (m.grid, m.codebook_size, m.num_classes) == ((28, 28), 256, 10)
    assert PriorConfig.preset("tiny", dim=64).dim == 64
    with pytest.raises(ValueError, match=r"unknown PriorConfig preset 'ffhq512'.*ffhq1024"):
        PriorConfig.preset("ffhq512")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['width'\].*valid keys.*'dim'"):
        PriorConfig.preset("tiny", width=64)


def test_config_json_round_trip_keeps_nested_depth():
    c = PriorConfig.preset("tiny", depth=(2, (1, 3, 1), 2), grid=(7, 5), num_classes=4)
    again = PriorConfig.from_dict(json.loads(c.to_json()))
    assert again == c and again.depth == (2, (1, 3, 1), 2) and again.grid == (7, 5)
    assert again.levels == 2 and again.num_blocks == 9


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(heads=3), r"heads=3 does not divide dim=32"),
        (dict(dim_head=6), r"head width 6 .* divisible by 4"),
        (dict(dim=40, heads=4), r"head width 10 .* divisible by 4"),
        (dict(depth=(2, 10)), r"depth = \(2, 10\) is not a valid depth"),
        (dict(depth=(2, 0, 2)), r"depth\[1\] must be >= 1"),
        (dict(depth=(-1, 2, 2)), r"pre = -1 must be an int >= 0"),
        (dict(depth=0), r"depth must be >= 1"),
        (dict(grid=(0, 4)), r"grid must be \(h, w\) with h, w >= 1"),
        (dict(grid=(16,)), r"grid must be \(h, w\)"),
        (dict(codebook_size=1), r"codebook_size must be >= 2"),
        (dict(dim=0), r"dim must be an integer >= 1, got 0"),
        (dict(ff_mult=True), r"ff_mult must be an integer >= 1, got True"),
        (dict(shorten_factor=1), r"shorten_factor must be >= 2"),
        (dict(num_classes=-1), r"num_classes must be an integer >= 0"),
        (dict(dropout=1.5), r"dropout must lie in \[0, 1\), got 1.5"),
        (dict(num_classes=10, null_class=False), r"class_dropout=0.1 needs null_class=True"),
        (dict(rotary_base=1), r"rotary_base must be a number > 1"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        PriorConfig.preset("tiny", **overrides)


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def test_save_load_bit_identical(tmp_path):
    prior = tiny_prior(depth=TWO_LEVELS, num_classes=3)
    path = tmp_path / "prior.safetensors"
    save_prior(prior, path, metadata={"sundae.codec": "pixel:levels=16,channels=1"})
    loaded = load_prior(str(path))
    assert loaded.config == prior.config and not loaded.training
    assert loaded.metadata["sundae.codec"] == "pixel:levels=16,channels=1"
    assert loaded.metadata["sundae.model_type"] == "sundae_prior"
    tokens, labels = torch.randint(0, 16, (2, 7, 5)), torch.tensor([1, -1])
    with torch.no_grad():
        assert torch.equal(prior(tokens, labels), loaded(tokens, labels))
    # saving a loaded prior keeps its metadata
    save_prior(loaded, tmp_path / "again.safetensors")
    assert load_prior(tmp_path / "again.safetensors").metadata["sundae.codec"].startswith("pixel:")


def test_load_names_missing_and_unexpected_keys(tmp_path):
    prior = tiny_prior()
    cfg = prior.config.to_json()
    sd = dict(prior.state_dict())
    save_native({**sd, "body.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors",
                model_type="sundae_prior", config_json=cfg)
    with pytest.raises(ValueError, match=r"unexpected keys \['body.extra.weight'\]"):
        load_prior(tmp_path / "extra.safetensors")
    del sd["to_logits.bias"]
    save_native(sd, tmp_path / "missing.safetensors", model_type="sundae_prior", config_json=cfg)
    with pytest.raises(ValueError, match=r"missing keys \['to_logits.bias'\]"):
        load_prior(tmp_path / "missing.safetensors")


def test_load_rejects_other_model_types_and_bad_sources(tmp_path):
    prior = tiny_prior()
    save_native(prior.state_dict(), tmp_path / "vq.safetensors", model_type="vqgan",
                config_json=prior.config.to_json())
    with pytest.raises(ValueError, match=r"holds a 'vqgan' model, not a 'sundae_prior'"):
        load_prior(tmp_path / "vq.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prior(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=r"name the prior file"):
        load_prior("hf://owner/repo")
    with pytest.raises(ValueError, match=r"reserved"):
        save_prior(prior, tmp_path / "x.safetensors", metadata={"sundae.config": "{}"})
    # config in the file with an unknown key: strict
    bad = json.loads(prior.config.to_json()) | {"flavour": "vanilla"}
    save_native(prior.state_dict(), tmp_path / "cfg.safetensors", model_type="sundae_prior",
                config_json=json.dumps(bad))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['flavour'\]; valid keys"):
        load_prior(tmp_path / "cfg.safetensors")


def test_hf_source_offline_uncached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache.*offline"):
        load_prior("hf://sundae-test/no-such-repo/prior.safetensors")


def test_saved_tensors_are_plain_state_dict(tmp_path):
    prior = tiny_prior(depth=TWO_LEVELS)
    save_prior(prior, tmp_path / "p.safetensors")
    assert set(load_safetensors(tmp_path / "p.safetensors")) == set(prior.state_dict())
