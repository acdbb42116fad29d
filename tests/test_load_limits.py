"""Loaders check a file's declared shapes and config before they allocate anything.

A file whose config disagrees with its tensors, or that describes an absurd model, must be
refused before the model is built for real and before tensor data is read (the checks run on
the safetensors header, or on a zip checkpoint unpickled onto the meta device, with the model
built on the meta device). The tests spy on the real constructors and on the data readers and
assert that neither ran, so they prove "before allocating" without allocating gigabytes.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from comfyui_sundae.sundae_lib import (
    VQGAN,
    PriorConfig,
    SundaePrior,
    VQGANConfig,
    _helpers,
    load_prior,
    load_vqgan,
    save_prior,
    save_vqgan,
    vqgan_loading,
)
from comfyui_sundae.sundae_lib.safe_pickle import CheckpointSizeError, safe_torch_load
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = pytest.mark.usefixtures("one_thread")


class _Spy:
    """Records the device every model construction allocated on, and every data read."""

    def __init__(self, monkeypatch):
        self.builds: list[str] = []
        self.reads: list[str] = []
        for cls in (SundaePrior, VQGAN):
            original = cls.__init__

            def init(obj, *args, _original=original, **kwargs):
                self.builds.append(torch.empty(0).device.type)  # the default device right now
                _original(obj, *args, **kwargs)

            monkeypatch.setattr(cls, "__init__", init)
        original_read = _helpers.load_safetensors

        def read(path):
            self.reads.append(str(path))
            return original_read(path)

        # every module that reads tensor data from a .safetensors file: load_prior and
        # load_vqgan_native through _helpers.load_native_model, other VQ-GAN files directly
        for module in (_helpers, vqgan_loading):
            monkeypatch.setattr(module, "load_safetensors", read)
        original_load = torch.load

        def load(f, *args, **kwargs):
            if kwargs.get("map_location") != "meta":
                self.reads.append(str(f))
            return original_load(f, *args, **kwargs)

        monkeypatch.setattr(torch, "load", load)

    @property
    def real_builds(self) -> list[str]:
        return [d for d in self.builds if d != "meta"]


def _rewrite_config(src, dst, **changes) -> None:
    """Copy a native file with fields of its config JSON changed (tensors untouched)."""
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    config = json.loads(meta["sundae.config"])
    config.update(changes)
    meta["sundae.config"] = json.dumps(config)
    save_file(tensors, str(dst), metadata=meta)


@pytest.fixture()
def tiny_prior_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_prior(SundaePrior(PriorConfig.preset("tiny")), path)
    return path


# ---------------------------------------------------------------------------------------------
# priors
# ---------------------------------------------------------------------------------------------


def test_prior_config_larger_than_its_tensors_is_refused_before_allocating(tmp_path, tiny_prior_file, monkeypatch):
    # the tiny file (~200 KB) says dim=1024: building it for real would take ~0.5 GB
    _rewrite_config(tiny_prior_file, tmp_path / "wide.safetensors", dim=1024)
    spy = _Spy(monkeypatch)
    with pytest.raises(ValueError, match=r"wide\.safetensors.*do not match the model config.*file \(32,\) vs model \(1024,\)"):
        load_prior(tmp_path / "wide.safetensors")
    assert spy.builds and spy.real_builds == []  # built on the meta device only
    assert spy.reads == []  # not a byte of tensor data read


@pytest.mark.parametrize(
    ("changes", "limit"),
    [
        ({"grid": [100000, 100000]}, r"grid \[100000, 100000\] exceeds the limit of 1024 tokens per side \(MAX_GRID_SIDE\)"),
        ({"dim": 1 << 20, "heads": 2}, r"parameters, more than the limit of 2,000,000,000 \(MAX_PARAMETERS"),
        ({"depth": 10_000}, r"limits are 512 blocks \(MAX_BLOCKS\)"),
        ({"depth": [1, [1, [1, [1, [1, [1, [1, [1, [1, 1, 1], 1], 1], 1], 1], 1], 1], 1], 1]},
         r"more than 8 levels \(MAX_LEVELS\)"),
    ],
    ids=["grid", "parameters", "blocks", "levels"],
)
def test_absurd_prior_configs_are_refused_naming_the_limit(tmp_path, tiny_prior_file, monkeypatch, changes, limit):
    _rewrite_config(tiny_prior_file, tmp_path / "absurd.safetensors", **changes)
    spy = _Spy(monkeypatch)
    with pytest.raises(ValueError, match=limit) as info:
        load_prior(tmp_path / "absurd.safetensors")
    assert "absurd.safetensors" in str(info.value)
    assert spy.real_builds == [] and spy.reads == []


def test_valid_prior_still_loads_identically(tiny_prior_file, monkeypatch):
    original = load_prior(tiny_prior_file)
    spy = _Spy(monkeypatch)
    again = load_prior(tiny_prior_file)
    assert spy.builds == ["meta", "cpu"]  # one shape check, one real build
    assert spy.reads == [str(tiny_prior_file)]  # the spy sees the data read (once)
    for key, value in original.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def test_meta_build_is_cheap_and_imports_nothing_heavy():
    # random init is skipped on meta tensors (torch's normal_ reference would import dynamo)
    model = _helpers.build_on_meta(lambda: SundaePrior(PriorConfig.preset("ffhq256")))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 170_000_000


# ---------------------------------------------------------------------------------------------
# VQ-GANs: native files, taming safetensors, zip checkpoints
# ---------------------------------------------------------------------------------------------


def test_native_vqgan_config_disagreeing_with_tensors_is_refused(tmp_path, monkeypatch):
    save_vqgan(VQGAN(VQGANConfig.preset("tiny")), tmp_path / "vq.safetensors")
    _rewrite_config(tmp_path / "vq.safetensors", tmp_path / "wide.safetensors", ch=512)
    _rewrite_config(tmp_path / "vq.safetensors", tmp_path / "levels.safetensors", ch_mult=[1] * 40)
    spy = _Spy(monkeypatch)
    with pytest.raises(ValueError, match=r"wide\.safetensors.*do not match the model config"):
        load_vqgan(tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"40 levels.*limits of 10 levels \(MAX_LEVELS\)"):
        load_vqgan(tmp_path / "levels.safetensors")
    assert spy.real_builds == [] and spy.reads == []
    assert isinstance(load_vqgan(tmp_path / "vq.safetensors"), VQGAN)  # the honest file loads ...
    assert spy.real_builds == ["cpu"] and spy.reads == [str(tmp_path / "vq.safetensors")]  # ... read once


def _tiny_taming_state_dict():
    return VQGAN(VQGANConfig.preset("tiny")).state_dict()


def test_zip_checkpoint_disagreeing_with_config_is_refused_before_reading_data(tmp_path, monkeypatch):
    torch.save({"state_dict": _tiny_taming_state_dict(), "epoch": 1}, tmp_path / "m.ckpt")
    spy = _Spy(monkeypatch)
    with pytest.raises(ValueError, match=r"m\.ckpt.*do not match the model config.*vs model \(512,"):
        load_vqgan(tmp_path / "m.ckpt", config=VQGANConfig.preset("tiny", ch=256))
    assert spy.real_builds == [] and spy.reads == []  # only the pickle was read (meta tensors)
    model = load_vqgan(tmp_path / "m.ckpt", config={"norm_groups": 4})  # the honest config loads
    assert isinstance(model, VQGAN) and spy.real_builds == ["cpu"]


def test_taming_safetensors_disagreeing_with_config_is_refused(tmp_path, monkeypatch):
    save_file(dict(_tiny_taming_state_dict()), str(tmp_path / "taming.safetensors"))
    spy = _Spy(monkeypatch)
    with pytest.raises(ValueError, match=r"taming\.safetensors.*do not match the model config"):
        load_vqgan(tmp_path / "taming.safetensors", config=VQGANConfig.preset("tiny", ch=64))
    assert spy.real_builds == [] and spy.reads == []
    assert isinstance(load_vqgan(tmp_path / "taming.safetensors", config=VQGANConfig.preset("tiny")), VQGAN)
    assert spy.reads == [str(tmp_path / "taming.safetensors")]  # the spy sees the data read (once)


def _recompress(src, dst) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def test_zip_records_that_inflate_are_refused_before_inflating(tmp_path, monkeypatch):
    # 40 MB of zeros deflate ~1000x: the central directory declares the size, nothing is inflated
    payload = {"state_dict": {**_tiny_taming_state_dict(), "loss.pad": torch.zeros(10_000_000)}}
    torch.save(payload, tmp_path / "plain.ckpt")
    _recompress(tmp_path / "plain.ckpt", tmp_path / "bomb.ckpt")
    size = (tmp_path / "bomb.ckpt").stat().st_size
    assert size < 400_000  # ~170x smaller than what it declares
    spy = _Spy(monkeypatch)
    with pytest.raises(CheckpointSizeError, match=r"bomb\.ckpt.*declares 40,.*at most 4x the file size.*MAX_INFLATION"):
        load_vqgan(tmp_path / "bomb.ckpt", config={"norm_groups": 4})
    with pytest.raises(CheckpointSizeError):
        safe_torch_load(tmp_path / "bomb.ckpt", map_location="meta")
    assert spy.reads == [] and spy.real_builds == []


def test_mildly_recompressed_zip_still_loads(tmp_path):
    # real weights barely compress: a re-zipped checkpoint stays far below the inflation limit
    sd = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in _tiny_taming_state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "plain.ckpt")
    _recompress(tmp_path / "plain.ckpt", tmp_path / "zipped.ckpt")
    model = load_vqgan(tmp_path / "zipped.ckpt", config={"norm_groups": 4})
    assert torch.equal(model.state_dict()["encoder.conv_in.weight"], sd["encoder.conv_in.weight"])


def test_legacy_pickle_declaring_more_storage_than_the_file_holds_is_refused(tmp_path, monkeypatch):
    # legacy format: torch allocates each declared storage, then fills it from the file; a file
    # cut after its pickle still declares 40 MB — refused before torch allocates any of it
    torch.save({"state_dict": {"w": torch.zeros(10_000_000)}}, tmp_path / "full.ckpt",
               _use_new_zipfile_serialization=False)
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:2000])
    allocated = []
    original = torch.UntypedStorage.__new__

    def new(cls, *args, **kwargs):
        if args and isinstance(args[0], int) and args[0] >= 1_000_000:
            allocated.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "__new__", new)
    with pytest.raises(CheckpointSizeError, match=r"cut\.ckpt.*declares 40,000,000 bytes of tensor storage.*2,000 bytes"):
        safe_torch_load(tmp_path / "cut.ckpt")
    assert allocated == []
