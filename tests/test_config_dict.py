"""The one dataclass coercer (``sundae_lib.config_dict``): Python mappings for the library's
configs, config-file tables (type-checked) for the trainer's; both sides go through it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from comfyui_sundae.sundae_lib.config_dict import check_keys, config_from_dict, type_name
from comfyui_sundae.sundae_lib.pixel_codec import PixelCodec
from comfyui_sundae.sundae_lib.prior import PriorConfig, SundaePrior
from comfyui_sundae.sundae_lib.vq_losses import VQLossConfig
from comfyui_sundae.sundae_lib.vqgan import VQGAN
from comfyui_sundae.sundae_lib.vqgan_config import VQGANConfig
from comfyui_sundae.trainer import config as C


class Problem(ValueError):
    """Stands in for the trainer's ConfigError: the coercer raises the class it is given."""


@dataclass
class Inner:
    size: int = 1
    pair: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self) -> None:
        if self.size > 9:
            raise ValueError(f"size {self.size} is more than 9")


@dataclass
class Outer:
    name: str = "x"
    rate: float = 1.0
    depth: int | tuple[int, ...] = 2
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# a Python mapping: lists -> tuples, the dataclass checks its values
# --------------------------------------------------------------------------------------------


def test_mapping_lists_become_tuples_at_every_depth():
    built = config_from_dict(Outer, {"depth": [1, [2, 3]], "rate": 2})
    assert built.depth == (1, (2, 3)) and isinstance(built.depth[1], tuple)
    assert built.rate == 2 and isinstance(built.rate, int)  # no type coercion for mappings


def test_mapping_errors_name_the_config():
    with pytest.raises(ValueError, match=re.escape(
            "Outer: unknown key(s) ['nmae', 'zz']; valid keys are ['depth', 'extra', 'inner', 'name', 'rate']")):
        config_from_dict(Outer, {"nmae": "y", "zz": 1})
    with pytest.raises(ValueError, match=re.escape("my config: expected a mapping of settings, got list")):
        config_from_dict(Outer, [1], what="my config")
    with pytest.raises(ValueError, match=r"^size 12 is more than 9$"):  # the class's own words
        config_from_dict(Inner, {"size": 12})


def test_library_configs_use_it():
    with pytest.raises(ValueError, match=re.escape("VQGANConfig: unknown key(s) ['chx']")):
        VQGANConfig.from_dict({"chx": 1})
    with pytest.raises(ValueError, match=re.escape("VQLossConfig: unknown key(s) ['disc_weigth']")):
        VQLossConfig.from_dict({"disc_weigth": 1.0})
    with pytest.raises(ValueError, match=re.escape("PriorConfig.preset('tiny'): unknown key(s) ['width']")):
        PriorConfig.preset("tiny", width=8)
    assert VQGANConfig.from_dict({"ch_mult": [1, 2], "attn_resolutions": []}).ch_mult == (1, 2)


# --------------------------------------------------------------------------------------------
# a config-file table: values checked against the annotations
# --------------------------------------------------------------------------------------------


def test_table_values_are_checked_and_converted():
    built = config_from_dict(
        Outer, {"rate": 3, "depth": [1, 2.0], "inner": {"size": 4.0, "pair": [1, 2]}, "extra": {"a": 1}},
        table="", error=Problem)
    assert built.rate == 3.0 and isinstance(built.rate, float)
    assert built.depth == (1, 2) and all(isinstance(d, int) for d in built.depth)
    assert built.inner == Inner(size=4, pair=(1.0, 2.0)) and isinstance(built.inner.size, int)
    assert config_from_dict(Outer, {"depth": 5}, table="", error=Problem).depth == 5


@pytest.mark.parametrize("data, message", [
    ({"rate": "fast"}, "run.rate expects float, got 'fast' (str)"),
    ({"rate": True}, "run.rate expects float, got True (bool)"),
    ({"depth": "deep"}, "run.depth expects int or array of int, got 'deep' (str)"),
    ({"inner": {"size": 1.5}}, "run.inner.size expects int, got 1.5 (float)"),
    ({"inner": {"pair": [1]}}, "run.inner.pair expects array of 2 float, got 1 values: [1]"),
    ({"inner": {"pair": [1, "a"]}}, "run.inner.pair[1] expects float, got 'a' (str)"),
    ({"inner": 3}, "[run.inner] must be a table of settings, got 3 (int)"),
    ({"inner": {"sise": 1}}, "unknown key(s) run.inner.sise in [run.inner]; valid keys there: pair, size"),
    ({"inner": {"size": 12}}, "[run.inner]: size 12 is more than 9"),
    ({"extra": [1]}, "run.extra expects a table, got [1] (list)"),
])
def test_table_errors_name_the_key_as_the_file_spells_it(data, message):
    with pytest.raises(Problem, match="^" + re.escape(message) + "$"):
        config_from_dict(Outer, data, table="run", error=Problem)


def test_top_level_table_and_the_trainer_wrapper():
    with pytest.raises(Problem, match=re.escape("the top level must be a table of settings, got 'x' (str)")):
        config_from_dict(Outer, "x", table="", error=Problem)
    with pytest.raises(C.ConfigError, match=re.escape(
            "unknown key(s) nope in the top level; valid keys there: codec, data, loss, model, optim, run, sampling")):
        C.build_dataclass(C.TrainPriorConfig, {"nope": 1})
    cfg = C.build_dataclass(C.TrainPriorConfig, {"model": "tiny", "optim": {"lr": 1}})
    assert cfg.model == {"preset": "tiny"} and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_check_keys_lists_extra_valid_names_first():
    check_keys({"b": 1}, ["a", "b"], table="model")  # known: no error
    with pytest.raises(Problem, match=re.escape(
            "unknown key(s) model.c, model.d in [model]; valid keys there: preset, a, b")):
        check_keys({"c": 1, "d": 2, "preset": "x"}, ["b", "a"], table="model", also_valid=("preset",),
                   error=Problem)
    with pytest.raises(C.ConfigError, match=re.escape("unknown key(s) model.chx in [model]; valid keys there: preset, ")):
        C.validate_model_table({"preset": "tiny", "chx": 1}, VQGANConfig)
    assert C.validate_model_table({"preset": "tiny", "ch_mult": [1, 2]}, VQGANConfig) == ("tiny", {"ch_mult": (1, 2)})


def test_type_names():
    assert type_name(float) == "float" and type_name(dict[str, int]) == "table"
    assert type_name(tuple[float, float]) == "array of 2 float" and type_name(Inner) == "table"
    assert type_name(int | str) == "int or str" and type_name(tuple[int, ...]) == "array of int"


@pytest.mark.parametrize(("model", "expected"), [
    (lambda: VQGAN(VQGANConfig.preset("tiny", remap_used=20, in_channels=1)),
     {"downsample_factor": 2, "codebook_size": 20, "in_channels": 1, "out_channels": 3}),
    (lambda: PixelCodec(levels=16, channels=3),
     {"spec": "pixel:levels=16,channels=3", "levels": 16, "codebook_size": 16, "in_channels": 3,
      "out_channels": 3, "downsample_factor": 1}),
    (lambda: SundaePrior(PriorConfig.preset("tiny", num_classes=5)),
     {"codebook_size": 16, "num_classes": 5}),
], ids=["vqgan", "pixel", "prior"])
def test_config_properties_read_the_config_and_are_read_only(model, expected):
    """The size attributes (``config_property``) give the config's values with their types, carry
    a docstring, and refuse assignment like a setter-less ``@property``."""
    m = model()
    for name, value in expected.items():
        got = getattr(m, name)
        assert got == value and type(got) is type(value), (name, got)
        assert getattr(type(m), name).__doc__, name
        with pytest.raises(AttributeError, match="has no setter"):
            setattr(m, name, value)
        assert getattr(m, name) == value
