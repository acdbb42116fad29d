"""load_vqgan never runs code from a checkpoint, and refuses what it cannot load faithfully.

Each malicious file is first shown to be live: a control copy (writing a different marker) is
unpickled with ``torch.load(weights_only=False)`` and its marker appears. The same payload given
to ``load_vqgan`` must either be refused with an error naming the global, or (for names under
the inert Lightning / omegaconf / pathlib prefixes) be absorbed by an inert stand-in; in both
cases the marker file must not exist afterwards. Bad input (unknown types, truncated files, foreign
architectures, incomplete weights) must fail with an error naming the problem.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pathlib
import pickle
import subprocess
import threading
import types

import pytest
import torch
from comfyui_sundae.sundae_lib import VQGAN, VQGANConfig, load_vqgan, save_vqgan
from comfyui_sundae.sundae_lib.safe_pickle import (
    InertStandIn,
    UnsafeCheckpointError,
    is_inert_name,
    safe_torch_load,
    stand_in,
)
from safetensors.torch import save_file

# the crafted pickles declare protocol 4 on purpose; torch warns about that
pytestmark = [
    pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def _placeholder(*args):  # pickled by reference, then its GLOBAL bytes are swapped
    raise AssertionError("the placeholder must never be called")


class _Reduce:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _swap_pickle_module(swaps: dict[bytes, bytes], *, protocol4_header: bool) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.save`` that rewrites GLOBAL opcodes in the main pickle
    (e.g. to a dotted name like ``pathlib Path.write_text``, which the standard pickler would
    never emit) and can mark the pickle as protocol 4, under which a real unpickler resolves
    dotted names attribute by attribute."""

    class SwapPickler(pickle.Pickler):
        def __init__(self, file, protocol=None, **kwargs):
            self._out, self._buf = file, io.BytesIO()
            super().__init__(self._buf, protocol=protocol, **kwargs)

        def dump(self, obj):
            super().dump(obj)
            data = self._buf.getvalue()
            for old, new in swaps.items():
                assert old in data
                data = data.replace(old, new)
            if protocol4_header:
                assert data[:2] == b"\x80\x02"
                data = b"\x80\x04" + data[2:]
            self._out.write(data)

    module = types.ModuleType("swap_pickle")
    module.Pickler, module.dump, module.load, module.Unpickler = (
        SwapPickler,
        pickle.dump,
        pickle.load,
        pickle.Unpickler,
    )
    return module


def _tiny_state_dict():
    return VQGAN(VQGANConfig.preset("tiny")).state_dict()


PAYLOADS = (
    "os.system",
    "builtins.exec",
    "subprocess.call",
    "pathlib.Path.write_text",
    "pathlib.os.system",
)
# the name the pickle references (protocol 2 writes subprocess.call under its Python 2 name)
REFUSED = {
    "os.system": "'posix.system'",
    "builtins.exec": "'builtins.exec'",
    "subprocess.call": "'(commands|subprocess).call'",
}


def _craft(path: pathlib.Path, kind: str, marker: pathlib.Path, *, zip_format: bool) -> None:
    """A Lightning-looking checkpoint (valid VQ weights under ``state_dict``) whose unpickling
    creates ``marker`` when code from the file runs."""
    placeholder = f"c{_placeholder.__module__}\n_placeholder\n".encode()
    swaps, proto4 = {}, False
    if kind == "os.system":
        evil = _Reduce(os.system, (f"touch {marker}",))
    elif kind == "builtins.exec":
        evil = _Reduce(builtins.exec, (f"open({str(marker)!r}, 'w').write('pwned')",))
    elif kind == "subprocess.call":
        evil = _Reduce(subprocess.call, (["touch", str(marker)],))
    elif kind == "pathlib.Path.write_text":  # Path.write_text(PosixPath(marker), "pwned")
        evil = _Reduce(_placeholder, (pathlib.PosixPath(marker), "pwned"))
        swaps, proto4 = {placeholder: b"cpathlib\nPath.write_text\n"}, True
    elif kind == "pathlib.os.system":  # pathlib imports os: a dotted name reaching os.system
        evil = _Reduce(_placeholder, (f"touch {marker}",))
        swaps, proto4 = {placeholder: b"cpathlib\nos.system\n"}, True
    else:  # pragma: no cover
        raise AssertionError(kind)
    payload = {"state_dict": _tiny_state_dict(), "callbacks": {"x": evil}, "epoch": 1}
    module = _swap_pickle_module(swaps, protocol4_header=proto4) if swaps else pickle
    torch.save(payload, path, pickle_module=module, _use_new_zipfile_serialization=zip_format)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_checkpoint_runs_nothing(tmp_path, kind, zip_format):
    # control: the payload is live when unpickled the unsafe way
    control_marker = tmp_path / "control_pwned"
    _craft(tmp_path / "control.ckpt", kind, control_marker, zip_format=zip_format)
    torch.load(tmp_path / "control.ckpt", weights_only=False)
    assert control_marker.exists(), "the crafted payload did not run in the control"

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    _craft(path, kind, marker, zip_format=zip_format)
    safe_before = set(map(str, torch.serialization.get_safe_globals()))
    if kind in REFUSED:
        with pytest.raises(
            UnsafeCheckpointError,
            match=rf"{REFUSED[kind]}.*nothing from the file was executed.*safetensors",
        ) as info:
            load_vqgan(path, config=VQGANConfig.preset("tiny"))
        assert str(path) in str(info.value)
    else:  # the name lies under an inert prefix: answered by an inert stand-in, never the real object
        model = load_vqgan(path, config=VQGANConfig.preset("tiny"))
        assert isinstance(model, VQGAN)
    assert not marker.exists(), f"{kind}: code from the checkpoint ran"
    assert set(map(str, torch.serialization.get_safe_globals())) == safe_before


def test_stand_ins_are_inert():
    for name in (
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.Path.write_text",
        "pathlib.os.system",
    ):
        cls = stand_in(name)
        assert issubclass(cls, InertStandIn)
        assert f"{cls.__module__}.{cls.__qualname__}" == name
        assert cls is not pathlib.Path and not issubclass(cls, pathlib.PurePath)
        obj = cls("/tmp/x", "data", mode="w")
        assert not hasattr(obj, "write_text") and not hasattr(obj, "open")
        obj.__setstate__({"anything": 1})
        assert stand_in(name) is cls  # one class per name
    attr_dict = stand_in("pytorch_lightning.utilities.parsing.AttributeDict")
    assert type(attr_dict.__new__(attr_dict)) is dict  # filled by SETITEMS, must be a plain dict
    for name in (
        "os.system",
        "posix.system",
        "builtins.eval",
        "builtins.getattr",
        "subprocess.Popen",
        "torch.nn.modules.conv.Conv2d",
        "numpy.load",
    ):
        assert not is_inert_name(name)
        with pytest.raises(UnsafeCheckpointError):
            stand_in(name)
    for name in (
        "omegaconf.dictconfig.DictConfig",
        "typing.Any",
        "numpy._core.multiarray.scalar",
        "numpy.dtypes.Float64DType",
        "_codecs.encode",
        "lightning_fabric.utilities.data.AttributeDict",
    ):
        assert is_inert_name(name)


def test_malicious_bin_in_diffusers_folder(tmp_path):
    folder = tmp_path / "vqvae"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "VQModel",
                "block_out_channels": [8, 16],
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2,
                "norm_num_groups": 4,
            }
        )
    )  # a valid config (an invalid one is refused before the weights are opened)
    marker = tmp_path / "pwned"
    _craft(folder / "diffusion_pytorch_model.bin", "os.system", marker, zip_format=True)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_vqgan(tmp_path)  # pipeline root -> vqvae/
    assert not marker.exists()


def test_unknown_class_is_refused_not_stood_in(tmp_path):
    # a pickled nn.Module is not inert data: refuse it with its name, do not try to rebuild it
    torch.save({"state_dict": torch.nn.Conv2d(1, 1, 1)}, tmp_path / "module.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.conv\.Conv2d"):
        load_vqgan(tmp_path / "module.ckpt")


def test_safe_torch_load_plain_weights(tmp_path):
    weights = {"a": torch.arange(4.0), "b": {"c": torch.ones(2, dtype=torch.int64)}}
    torch.save(weights, tmp_path / "w.pt")
    loaded = safe_torch_load(tmp_path / "w.pt")
    assert torch.equal(loaded["a"], weights["a"]) and torch.equal(
        loaded["b"]["c"], weights["b"]["c"]
    )


def test_allow_list_is_scoped_to_the_load(tmp_path, monkeypatch):
    """While safe_torch_load stands in for a global, a plain weights-only torch.load running at
    that very moment (same thread or another) still refuses the global: nothing process-wide."""
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": pathlib.PosixPath("/data")}, tmp_path / "a.ckpt")
    torch.save({"path": pathlib.PosixPath("/x")}, tmp_path / "plain.pt")
    outcomes = []

    def plain_load():
        try:
            torch.load(tmp_path / "plain.pt", weights_only=True)
            outcomes.append("accepted")
        except pickle.UnpicklingError as exc:
            outcomes.append("refused" if "pathlib.PosixPath" in str(exc) else str(exc))

    def during_load(self, *args, **kwargs):  # runs while our load unpickles the stand-in
        plain_load()
        other = threading.Thread(target=plain_load)
        other.start()
        other.join()

    monkeypatch.setattr(InertStandIn, "__init__", during_load)
    before = set(map(str, torch.serialization.get_safe_globals()))
    obj = safe_torch_load(tmp_path / "a.ckpt")
    assert isinstance(obj["hparams"], InertStandIn) and torch.equal(obj["state_dict"]["w"], torch.ones(2))
    assert outcomes == ["refused", "refused"]
    assert set(map(str, torch.serialization.get_safe_globals())) == before


def test_forced_weights_only_env_still_loads(tmp_path, monkeypatch):
    # TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch refuse a pickle_module: the locked fallback works
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"w": torch.arange(3.0), "hp": pathlib.PosixPath("/d")}, tmp_path / "a.ckpt")
    obj = safe_torch_load(tmp_path / "a.ckpt")
    assert torch.equal(obj["w"], torch.arange(3.0)) and isinstance(obj["hp"], InertStandIn)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_archive_is_refused_not_run(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "scripted.pt"))
    with pytest.raises(ValueError, match="TorchScript archive.*state_dict"):
        safe_torch_load(tmp_path / "scripted.pt")


# ---------------------------------------------------------------------------------------------
# bad input: each a clear error naming the problem
# ---------------------------------------------------------------------------------------------


def _small_taming_state_dict():
    """A taming-layout model whose widths (32, 64) suit taming's 32 norm groups."""
    cfg = VQGANConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(128,),
        z_channels=4,
        embed_dim=4,
        n_embed=32,
    )
    return dict(VQGAN(cfg).state_dict())


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vqgan(tmp_path / "nope.ckpt")
    (tmp_path / "weights.xyz").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"unknown file type '\.xyz'"):
        load_vqgan(tmp_path / "weights.xyz")
    (tmp_path / "config.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match="config file, not weights"):
        load_vqgan(tmp_path / "config.yaml")
    (tmp_path / "flax_model.msgpack").write_bytes(b"\x81\xa1a\x01")
    with pytest.raises(ValueError, match="Flax"):
        load_vqgan(tmp_path / "flax_model.msgpack")
    with pytest.raises(ValueError, match="config must be"):
        load_vqgan(tmp_path / "weights.xyz", config=42)


@pytest.mark.parametrize("kind", ["native", "zip-ckpt", "legacy-ckpt"])
def test_truncated_files(tmp_path, kind):
    model = VQGAN(VQGANConfig.preset("tiny"))
    if kind == "native":
        path = save_vqgan(model, tmp_path / "m.safetensors")
    else:
        path = tmp_path / "m.ckpt"
        torch.save(
            {"state_dict": model.state_dict()},
            path,
            _use_new_zipfile_serialization=kind == "zip-ckpt",
        )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated") as info:
        load_vqgan(path)
    assert "m." in str(info.value)  # names the file


def test_empty_and_foreign_checkpoints(tmp_path):
    torch.save({}, tmp_path / "empty.ckpt")
    with pytest.raises(ValueError, match="empty"):
        load_vqgan(tmp_path / "empty.ckpt")
    (tmp_path / "zero.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_vqgan(tmp_path / "zero.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="not a dict"):
        load_vqgan(tmp_path / "tensor.pth")
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, tmp_path / "unet.ckpt")
    with pytest.raises(ValueError, match="no VQ-GAN weights"):
        load_vqgan(tmp_path / "unet.ckpt")
    unleash = {
        "encoder.blocks.0.weight": torch.zeros(1),
        "generator.blocks.0.weight": torch.zeros(1),
    }
    torch.save(unleash, tmp_path / "vqgan_ema.th")
    with pytest.raises(ValueError, match="unleashing-transformers"):
        load_vqgan(tmp_path / "vqgan_ema.th")
    sd = dict(_small_taming_state_dict())
    sd["encoder.mid.attn_1.to_qkv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save({"state_dict": sd}, tmp_path / "linear.ckpt")
    with pytest.raises(ValueError, match="linear attention"):
        load_vqgan(tmp_path / "linear.ckpt")
    kl = {k: v for k, v in sd.items() if not k.startswith("quantize.") and "to_qkv" not in k}
    kl["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save({"state_dict": kl}, tmp_path / "kl.ckpt")
    with pytest.raises(ValueError, match="KL autoencoder"):
        load_vqgan(tmp_path / "kl.ckpt")


def test_strict_within_kept_families(tmp_path):
    sd = dict(_small_taming_state_dict())
    sd["decoder.extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd}, tmp_path / "extra.ckpt")
    with pytest.raises(ValueError, match="decoder.extra.weight"):
        load_vqgan(tmp_path / "extra.ckpt")
    sd.pop("decoder.extra.weight")
    sd.pop("decoder.up.1.block.1.conv2.weight")
    torch.save({"state_dict": sd}, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="decoder.up.1.block.1.conv2.weight"):
        load_vqgan(tmp_path / "missing.ckpt")


def _write_config(folder: pathlib.Path, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


def test_refused_diffusers_folders(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        load_vqgan(tmp_path / "plain")
    movq = _write_config(tmp_path / "movq", _class_name="VQModel", norm_type="spatial")
    with pytest.raises(ValueError, match="MoVQ"):
        load_vqgan(movq)
    (tmp_path / "kandinsky" / "movq").mkdir(parents=True)
    with pytest.raises(ValueError, match="MoVQ"):
        load_vqgan(tmp_path / "kandinsky")
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_vqgan(_write_config(tmp_path / "kl", _class_name="AutoencoderKL"))
    with pytest.raises(ValueError, match="PaellaVQModel"):
        load_vqgan(_write_config(tmp_path / "paella", _class_name="PaellaVQModel"))
    nowt = _write_config(tmp_path / "noweights", _class_name="VQModel")
    with pytest.raises(ValueError, match="no weights"):
        load_vqgan(nowt)


def test_movq_keys_without_config_are_refused(tmp_path):
    sd = dict(_small_taming_state_dict())
    sd["decoder.up.0.block.0.norm1.norm_layer.weight"] = torch.zeros(32)
    sd["decoder.up.0.block.0.norm1.conv_y.weight"] = torch.zeros(32, 4, 1, 1)
    save_file(sd, str(tmp_path / "movq.safetensors"))
    with pytest.raises(ValueError, match="MoVQ"):
        load_vqgan(tmp_path / "movq.safetensors")
