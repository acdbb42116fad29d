"""Recorded sampling settings are the defaults everywhere: one typed ``SamplingDefaults`` read from
and written to the prior file, used by ``sample()``, the trainer's ``[sampling]`` table, the CLI
and the ComfyUI sampler. Expected values come from the files' raw JSON or from explicit calls,
never from the code under test."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from click.testing import CliRunner
from comfyui_sundae.nodes import NODE_CLASS_MAPPINGS, sampler_node
from comfyui_sundae.nodes.types import PriorHandle
from comfyui_sundae.sundae_lib import (
    PriorConfig,
    PriorMetadata,
    SamplingDefaults,
    SundaePrior,
    load_prior,
    sample,
    save_prior,
)
from comfyui_sundae.sundae_lib import sampler as sampler_mod
from comfyui_sundae.sundae_lib.codec_spec import CodecSpec
from comfyui_sundae.trainer.cli import main
from comfyui_sundae.trainer.config import SamplingConfig, load_stage
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
RECORD = {"num_samples": 4, "steps": 7, "temperature": [0.9, 0.6], "update_proportion": [1.0, 0.8],
          "early_stop": False, "min_steps": 3, "cfg_scale": 2.5, "seed": 1}


def tiny_prior(**overrides) -> SundaePrior:
    torch.manual_seed(0)
    return SundaePrior(PriorConfig.preset("tiny", num_classes=3, **overrides)).eval()


def recorded_prior(tmp_path, record=RECORD, name="p.safetensors") -> tuple[SundaePrior, str]:
    path = tmp_path / name
    meta = {"sundae.codec": "pixel:levels=16,channels=1", "sundae.label_map": '["cat", "dog", "cow"]'}
    if record is not None:
        meta["sundae.sampling"] = record if isinstance(record, str) else json.dumps(record)
    save_prior(tiny_prior(codebook_size=16), path, metadata=meta)
    return load_prior(path), str(path)


@pytest.fixture
def guided(monkeypatch):
    """Records the cfg_scale of every forward the sampler makes."""
    calls: list[float] = []
    real = sampler_mod._guided_logits

    def spy(prior, tokens, labels, cfg_scale, k):
        calls.append(cfg_scale)
        return real(prior, tokens, labels, cfg_scale, k)

    monkeypatch.setattr(sampler_mod, "_guided_logits", spy)
    return calls


# --------------------------------------------------------------------------------------------
# the type and the file
# --------------------------------------------------------------------------------------------


def test_round_trip_file_to_dataclass_and_back(tmp_path):
    settings = SamplingDefaults(steps=12, temperature=(1.1, 0.5), update_proportion=0.9, early_stop=False,
                                min_steps=2, cfg_scale=4)
    meta = PriorMetadata(codec=CodecSpec(kind="vqgan", sha256="ab12", factor=4, channels=3, file="vq.safetensors"),
                         label_map=("a", "b", "c"), sampling=settings, train_step=42)
    path = tmp_path / "p.safetensors"
    save_prior(tiny_prior(), path, metadata=meta.to_metadata())
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
    # the file holds the documented strings (read without our reader)
    assert json.loads(raw["sundae.sampling"]) == {"steps": 12, "temperature": [1.1, 0.5],
                                                  "update_proportion": [0.9, 0.9], "early_stop": False,
                                                  "min_steps": 2, "cfg_scale": 4.0}
    assert raw["sundae.codec"] == "vqgan:sha256=ab12,factor=4,channels=3"
    assert raw["sundae.vqgan_file"] == "vq.safetensors"
    assert json.loads(raw["sundae.label_map"]) == ["a", "b", "c"] and raw["sundae.train_step"] == "42"
    back = PriorMetadata.of(load_prior(path))
    assert back == meta and back.sampling == settings
    assert SamplingDefaults.from_prior(load_prior(path)) == settings


@pytest.mark.parametrize("name", ["mnist-vq", "mnist-pixels", "emoji"])
def test_shipped_files_read_unchanged(name):
    """The shipped files' records (with the trainer's preview keys) read as they are."""
    prior = load_prior(name)
    raw = json.loads(prior.metadata["sundae.sampling"])
    got = SamplingDefaults.from_prior(prior)
    assert got.steps == raw["steps"] and got.cfg_scale == raw["cfg_scale"]
    assert list(got.temperature) == raw["temperature"] and list(got.update_proportion) == raw["update_proportion"]
    assert got.early_stop == raw["early_stop"] and got.min_steps == raw["min_steps"]
    meta = PriorMetadata.of(prior, strict=True)
    assert list(meta.label_map) == json.loads(prior.metadata["sundae.label_map"])
    assert str(meta.codec) == prior.metadata["sundae.codec"]


def test_partial_and_missing_records_fall_back_to_the_library_defaults(tmp_path, caplog):
    library = SamplingDefaults()
    assert (library.steps, library.temperature, library.update_proportion, library.cfg_scale) == (
        100, (1.0, 0.7), (1.0, 1.0), 1.0)
    assert SamplingDefaults.from_prior(tiny_prior()) == library  # a prior that never saw a file
    partial, _ = recorded_prior(tmp_path, {"steps": 9})
    assert SamplingDefaults.from_prior(partial) == dataclasses.replace(library, steps=9)
    broken, _ = recorded_prior(tmp_path, '{"steps": 0}', name="b.safetensors")
    with caplog.at_level(logging.WARNING):
        assert SamplingDefaults.from_prior(broken) == library
    assert "sampling.steps = 0" in caplog.text
    with pytest.raises(ValueError, match=r"sampling.temperature = \[0.0, 1.0\] must be > 0"):
        SamplingDefaults(temperature=(0.0, 1.0))


def test_trainer_sampling_table_is_the_type_and_is_what_the_file_records():
    cfg, _ = load_stage("prior", "mnist-vq", ["sampling.steps=33", "sampling.cfg_scale=2.0"])
    assert isinstance(cfg.sampling, SamplingDefaults) and isinstance(cfg.sampling, SamplingConfig)
    written = json.loads(PriorMetadata(sampling=cfg.sampling).to_metadata()["sundae.sampling"])
    assert written["steps"] == 33 and written["cfg_scale"] == 2.0 and written["num_samples"] == cfg.sampling.num_samples
    assert SamplingDefaults.from_record(written).sample_kwargs() == cfg.sampling.sample_kwargs()


# --------------------------------------------------------------------------------------------
# sample(): explicit > recorded > library
# --------------------------------------------------------------------------------------------


def test_sample_takes_unset_settings_from_the_record(tmp_path, guided):
    prior, _ = recorded_prior(tmp_path)
    totals = []
    got = sample(prior, batch_size=2, labels=[1, 2], generator=torch.Generator().manual_seed(3),
                 callback=lambda s, t, x: totals.append(t))
    assert totals == [7] * 7 and guided == [2.5] * 7  # recorded steps, no early stop, recorded cfg
    explicit = sample(prior, batch_size=2, labels=[1, 2], steps=7, temperature=(0.9, 0.6),
                      update_proportion=(1.0, 0.8), early_stop=False, min_steps=3, cfg_scale=2.5,
                      generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, explicit)
    unguided = sample(prior, batch_size=2, labels=[1, 2], cfg_scale=1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(got, unguided)  # the cfg really came from the file
    guided.clear()
    sample(prior, labels=[1], steps=3, generator=torch.Generator().manual_seed(3))  # steps given, cfg not
    assert guided == [2.5] * 3


def test_explicit_arguments_win(tmp_path, guided):
    prior, _ = recorded_prior(tmp_path)
    totals = []
    sample(prior, labels=1, steps=2, cfg_scale=1.5, generator=torch.Generator().manual_seed(0),
           callback=lambda s, t, x: totals.append(t))
    assert totals == [2, 2] and guided == [1.5, 1.5]


def test_recorded_guidance_is_skipped_where_it_cannot_act(tmp_path, guided):
    prior, _ = recorded_prior(tmp_path)
    sample(prior, batch_size=2, labels=None, steps=2, generator=torch.Generator().manual_seed(0))
    sample(prior, batch_size=2, labels="none", steps=2, generator=torch.Generator().manual_seed(0))
    assert guided == [1.0] * 4  # only null labels: u + s (u - u) = u, one branch is enough
    path = tmp_path / "u.safetensors"
    save_prior(SundaePrior(PriorConfig.preset("tiny")), path, metadata={"sundae.sampling": json.dumps(RECORD)})
    guided.clear()
    sample(load_prior(path), steps=2)  # an unconditional prior: the recorded cfg is not an error
    assert guided == [1.0, 1.0]
    with pytest.raises(ValueError, match="needs a class-conditional prior"):
        sample(load_prior(path), steps=2, cfg_scale=2.5)  # an explicit one still is


# --------------------------------------------------------------------------------------------
# the CLI and the node
# --------------------------------------------------------------------------------------------


def test_cli_options_not_given_come_from_the_record(tmp_path, guided):
    _, path = recorded_prior(tmp_path)
    out = str(tmp_path / "s.png")
    res = CliRunner().invoke(main, ["sample", "-m", path, "-n", "2", "--class", "dog", "--out", out])
    assert res.exit_code == 0, res.output
    assert guided == [2.5] * 7
    guided.clear()
    res = CliRunner().invoke(main, ["sample", "-m", path, "-n", "2", "--class", "1", "--steps", "2", "--cfg", "1",
                                    "--out", out])
    assert res.exit_code == 0, res.output
    assert guided == [1.0, 1.0]


def test_cli_help_says_where_the_defaults_come_from():
    res = CliRunner().invoke(main, ["sample", "--help"])
    assert res.exit_code == 0
    assert "recorded" in res.output and "100" in res.output


def _node_args(**kw):
    args = dict(seed=0, steps=0, temperature_start=0.0, temperature_end=0.0, update_start=0.0, update_end=0.0,
                early_stop=True, batch_size=1, class_label="none", cfg_scale=0.0, strength=1.0, width=0, height=0)
    args.update(kw)
    return args


def test_fresh_node_defaults_are_the_models_settings():
    spec = NODE_CLASS_MAPPINGS["SundaeSampler"].INPUT_TYPES()["required"]
    for name in ("steps", "temperature_start", "temperature_end", "update_start", "update_end", "cfg_scale"):
        assert spec[name][1]["default"] == 0 and spec[name][1]["min"] == 0, name
        assert "0 = the prior's recommended" in spec[name][1]["tooltip"], name
    assert spec["class_label"][0] == "STRING" and spec["class_label"][1]["default"] == "none"


def test_node_zero_widgets_take_the_record_and_others_override(tmp_path, monkeypatch):
    prior, _ = recorded_prior(tmp_path)
    handle = PriorHandle(prior, "p.safetensors", CPU, torch.float32, codec="pixel:levels=16,channels=1", factor=1)
    seen: list[dict] = []
    real = sampler_node.sundae_lib.sample

    def spy(model, **kw):
        seen.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(sampler_node.sundae_lib, "sample", spy)
    node = NODE_CLASS_MAPPINGS["SundaeSampler"]()
    with torch.inference_mode():
        node.run(handle, **_node_args(class_label="dog"))
        node.run(handle, **_node_args(class_label="dog", steps=3, temperature_end=0.4, update_start=0.5, cfg_scale=1.0))
    model, custom = seen
    assert (model["steps"], model["temperature"], model["update_proportion"]) == (7, (0.9, 0.6), (1.0, 0.8))
    assert model["cfg_scale"] is None and model["labels"] == 1  # None: the library takes the file's 2.5
    assert (custom["steps"], custom["temperature"], custom["update_proportion"]) == (3, (0.9, 0.4), (0.5, 0.8))
    assert custom["cfg_scale"] == 1.0


def test_node_model_settings_equal_an_explicit_call(tmp_path):
    """What a fresh node draws is what sample() draws with the file's values written out."""
    prior, _ = recorded_prior(tmp_path)
    handle = PriorHandle(prior, "p.safetensors", CPU, torch.float32, codec="pixel:levels=16,channels=1", factor=1)
    with torch.inference_mode():
        out = NODE_CLASS_MAPPINGS["SundaeSampler"]().run(handle, **_node_args(class_label="cow", seed=5, batch_size=2,
                                                                               early_stop=False))[0]
    want = sample(prior, batch_size=2, grid=(8, 8), labels=2, steps=7, temperature=(0.9, 0.6),
                  update_proportion=(1.0, 0.8), early_stop=False, min_steps=3, cfg_scale=2.5,
                  generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.tokens, want)
