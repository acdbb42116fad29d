"""load_vqgan: diffusers equivalence, taming / Lightning round trips, variants, yaml, bad input.

The diffusers tests compare against an independent implementation (diffusers' own ``VQModel``):
token ids must be identical and decodes within 1e-5. The Lightning tests pickle fake
Lightning / omegaconf classes that are removed from ``sys.modules`` before loading, so the
loader can only succeed through its inert stand-ins.
"""

from __future__ import annotations

import collections
import json
import logging
import pathlib
import sys
import types
import typing

import numpy as np
import pytest
import torch
from comfyui_sundae.sundae_lib import VQGAN, VQGANConfig, load_vqgan, save_vqgan

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
from conftest import perturb
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(b=2, c=3, h=16, w=20, seed=1):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _diffusers_vq(**overrides):
    diffusers = pytest.importorskip("diffusers")
    kwargs = dict(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        norm_num_groups=4,
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=32,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return perturb(diffusers.VQModel(**kwargs))


@torch.no_grad()
def _reference(dm, x):
    """diffusers' ids [b, h, w] and decode of the quantized latents."""
    h = dm.encode(x).latents
    z_q, _, (_, _, ids) = dm.quantize(h)
    b, _, hh, ww = h.shape
    ids = ids.reshape(b, hh, ww)
    if dm.config.lookup_from_codebook:  # decode straight from ids, diffusers' own path
        shape = (b, hh, ww, z_q.shape[1])
        dec = dm.decode(ids.flatten(), force_not_quantize=True, shape=shape).sample
    else:
        dec = dm.decode(z_q, force_not_quantize=True).sample
    return ids, dec


def _assert_equivalent(dm, ours, x, *, pixel01=False):
    ids, dec = _reference(dm, (x + 1) / 2 if pixel01 else x)
    tokens = ours.encode(x)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, ids)
    assert ids.unique().numel() > 3  # the comparison is not trivially all-one-code
    out = ours.decode(ids)  # [-1, 1] at our API; compare in diffusers' own pixel space
    torch.testing.assert_close((out + 1) / 2 if pixel01 else out, dec, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# diffusers equivalence
# ---------------------------------------------------------------------------------------------

DIFFUSERS_CASES = {
    "attn-level-and-mid": {},
    "no-attention-3-levels": dict(
        block_out_channels=[8, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=2,
        mid_block_add_attention=False,
        vq_embed_dim=6,
    ),
    "attn-3-levels-lookup": dict(
        block_out_channels=[8, 8, 16],
        down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"],
        lookup_from_codebook=True,
    ),
}


@pytest.mark.parametrize("case", sorted(DIFFUSERS_CASES))
def test_diffusers_folder_equivalence(tmp_path, case):
    dm = _diffusers_vq(**DIFFUSERS_CASES[case])
    dm.save_pretrained(tmp_path)
    ours = load_vqgan(tmp_path)
    assert not ours.training
    cfg = ours.config
    assert (cfg.ch, cfg.norm_groups, cfg.n_embed) == (8, 4, 32)
    assert cfg.mid_attention == dm.config.mid_block_add_attention
    assert cfg.pixel_range == "-1,1"
    _assert_equivalent(dm, ours, _images())


def test_amused_like_pixel_range_heuristic_and_override(tmp_path):
    # aMUSEd's signature: lookup_from_codebook + force_upcast, no attention anywhere
    dm = _diffusers_vq(
        block_out_channels=[8, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=True,
    )
    dm.save_pretrained(tmp_path)
    ours = load_vqgan(tmp_path)
    assert ours.config.pixel_range == "0,1"
    _assert_equivalent(dm, ours, _images(), pixel01=True)
    plain = load_vqgan(tmp_path, config={"pixel_range": "-1,1"})
    assert plain.config.pixel_range == "-1,1"
    _assert_equivalent(dm, plain, _images())


def test_diffusers_old_attention_names(tmp_path):
    dm = _diffusers_vq()
    dm.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for key, value in sd.items():
        for new_name, old_name in old.items():
            key = key.replace(new_name, old_name)
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed) and not any(".to_q." in k for k in renamed)
    save_file(renamed, str(weights))
    _assert_equivalent(dm, load_vqgan(tmp_path), _images())


def test_diffusers_legacy_bin_weights(tmp_path):
    dm = _diffusers_vq()
    dm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    _assert_equivalent(dm, load_vqgan(tmp_path), _images())


def test_diffusers_fp16_variant(tmp_path):
    dm = _diffusers_vq()
    dm.half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    dm.float()  # the fp16-rounded weights, in fp32 like ours
    ours = load_vqgan(tmp_path)
    assert ours.quant_conv.weight.dtype == torch.float32
    _assert_equivalent(dm, ours, _images())


def test_pipeline_root_with_vqvae_subfolder(tmp_path):
    dm = _diffusers_vq()
    dm.save_pretrained(tmp_path / "vqvae")
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "SomePipeline", "vqvae": ["diffusers", "VQModel"]})
    )
    _assert_equivalent(dm, load_vqgan(tmp_path), _images())


def test_diffusers_keys_without_config_json(tmp_path):
    dm = _diffusers_vq()
    path = tmp_path / "vq_diffusers_keys.safetensors"
    save_file({k: v.contiguous() for k, v in dm.state_dict().items()}, str(path))
    # GroupNorm's group count is not in the weights: taming's 32 cannot divide width 8
    with pytest.raises(ValueError, match="norm_groups"):
        load_vqgan(path)
    _assert_equivalent(dm, load_vqgan(path, config={"norm_groups": 4}), _images())


def test_diffusers_config_json_must_match_weights(tmp_path):
    dm = _diffusers_vq()
    dm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_vq_embeddings"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_vq_embeddings"):
        load_vqgan(tmp_path)


def test_diffusers_block_out_channels_not_multiples_of_first(tmp_path):
    dm = _diffusers_vq(block_out_channels=[8, 12])
    dm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"block_out_channels \[8, 12\]"):
        load_vqgan(tmp_path)


# ---------------------------------------------------------------------------------------------
# taming / Lightning checkpoints
# ---------------------------------------------------------------------------------------------

# widths divisible by 32 (taming's hard-wired group count) so the config is fully inferable
TAMING_SMALL = dict(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), resolution=256,
    z_channels=4, embed_dim=4, n_embed=32, norm_groups=32,
)  # fmt: skip


def _taming_model(**overrides) -> VQGAN:
    torch.manual_seed(0)
    return perturb(VQGAN(VQGANConfig(**{**TAMING_SMALL, **overrides})))


def _assert_same_model(a: VQGAN, b: VQGAN, *, channels=3):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = _images(c=channels, h=16, w=16)
    tokens = a.encode(x)
    assert torch.equal(b.encode(x), tokens)
    assert tokens.unique().numel() > 2
    torch.testing.assert_close(b.decode(tokens), a.decode(tokens), atol=0, rtol=0)


class _FakeModules:
    """Classes living in fake ``pytorch_lightning`` / ``omegaconf`` modules while pickling; the
    modules are removed again before loading."""

    def __init__(self):
        self.names = []

    def cls(self, module: str, qualname: str, bases=(object,)):
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # pickle imports the module, parents first
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                self.names.append(name)
        cls = type(qualname, bases, {"__module__": module, "__qualname__": qualname})
        setattr(sys.modules[module], qualname, cls)
        return cls

    def remove(self):
        for name in self.names:
            sys.modules.pop(name, None)


def _lightning_payload(sd: dict, fakes: _FakeModules) -> dict:
    ModelCheckpoint = fakes.cls("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    AttributeDict = fakes.cls("pytorch_lightning.utilities.parsing", "AttributeDict", (dict,))
    DictConfig = fakes.cls("omegaconf.dictconfig", "DictConfig")
    ContainerMetadata = fakes.cls("omegaconf.base", "ContainerMetadata")
    AnyNode = fakes.cls("omegaconf.nodes", "AnyNode")
    meta = ContainerMetadata()
    meta.__dict__.update(ref_type=typing.Any, object_type=dict, key_type=typing.Any, flags={})
    node = AnyNode()
    node.__dict__.update(_val=0.25, _metadata=meta)
    conf = DictConfig()
    conf.__dict__.update(_metadata=meta, _content={"base_learning_rate": node}, _parent=None)
    hparams = AttributeDict(embed_dim=4, ddconfig={"ch": 32})
    return {
        "epoch": 7,
        "global_step": 1234,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": sd,
        "callbacks": {
            ModelCheckpoint: {
                "best_model_score": torch.tensor(0.5),
                "monitor": "val/rec_loss",
                "np_score": np.float64(0.125),
                "best_k": collections.defaultdict(list, {"a": [1]}),
                "dirpath": pathlib.PurePosixPath("/logs/ckpts"),
            }
        },
        "optimizer_states": [
            {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": np.float32(1e-4)}]}
        ],
        "lr_schedulers": [],
        "hparams": hparams,
        "hyper_parameters": conf,
    }


def _junk(sd: dict) -> dict:
    out = dict(sd)
    out["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    out["loss.perceptual_loss.scaling_layer.shift"] = torch.randn(1, 3, 1, 1)
    out["loss.discriminator.main.1.running_mean"] = torch.randn(8)
    out["loss.discriminator.main.1.num_batches_tracked"] = torch.tensor(5)
    return out


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_lightning_ckpt_round_trip(tmp_path, zip_format):
    model = _taming_model()
    fakes = _FakeModules()
    try:
        payload = _lightning_payload(_junk(model.state_dict()), fakes)
        path = tmp_path / "last.ckpt"
        torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    finally:
        fakes.remove()
    assert "pytorch_lightning.callbacks.model_checkpoint" not in sys.modules
    assert "omegaconf.dictconfig" not in sys.modules
    # a plain weights-only load fails on these globals: the stand-ins are what makes it work
    with pytest.raises(Exception, match="GLOBAL"):
        torch.load(path, weights_only=True)
    safe_before = set(map(str, torch.serialization.get_safe_globals()))
    loaded = load_vqgan(path)
    assert set(map(str, torch.serialization.get_safe_globals())) == safe_before  # scoped only
    assert loaded.config == model.config
    _assert_same_model(model, loaded)


def test_combined_first_stage_checkpoint(tmp_path):
    model = _taming_model(mid_attention=False, attn_resolutions=())
    sd = {f"first_stage_model.{k}": v for k, v in model.state_dict().items()}
    sd["transformer.tok_emb.weight"] = torch.randn(32, 8)
    sd["cond_stage_model.quantize.embedding.weight"] = torch.randn(8, 4)  # must not leak in
    sd["model_ema.decay"] = torch.tensor(0.999)
    fakes = _FakeModules()
    try:
        torch.save(_lightning_payload(sd, fakes), tmp_path / "net2net.ckpt")
    finally:
        fakes.remove()
    loaded = load_vqgan(tmp_path / "net2net.ckpt")
    assert loaded.config == model.config
    _assert_same_model(model, loaded)


def test_taming_keys_safetensors(tmp_path):
    model = _taming_model()
    path = tmp_path / "taming.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _assert_same_model(model, load_vqgan(path))


def test_shape_pass_logs_nothing_twice(tmp_path, caplog):
    """load_vqgan first runs on the header's declared shapes, then on the tensors: what it logs
    (here vqgan_state_dict dropping the loss entries) appears once."""
    path = tmp_path / "with-loss.safetensors"
    save_file({k: v.contiguous() for k, v in _junk(_taming_model().state_dict()).items()}, str(path))
    with caplog.at_level(logging.INFO, logger="comfyui_sundae.sundae_lib"):
        load_vqgan(path)
    assert sum("ignoring non-VQ entries ['loss']" in r.getMessage() for r in caplog.records) == 1


def test_vq_diffusion_pth_bare_codebook_and_ema(tmp_path):
    model = _taming_model()
    sd = dict(model.state_dict())
    sd["quantize.embedding"] = sd.pop("quantize.embedding.weight")
    sd["quantize.embedding.cluster_size"] = torch.rand(32)  # EMA statistics: dropped
    sd["quantize.embedding.embed_avg"] = torch.rand(32, 4)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "taming_f16.pth")
    _assert_same_model(model, load_vqgan(tmp_path / "taming_f16.pth"))


def test_gumbel_variant_inferred(tmp_path):
    model = _taming_model(quantizer="gumbel")
    assert "quantize.proj.weight" in model.state_dict()
    torch.save({"state_dict": _junk(model.state_dict())}, tmp_path / "gumbel.ckpt")
    loaded = load_vqgan(tmp_path / "gumbel.ckpt")
    assert loaded.config.quantizer == "gumbel"
    assert loaded.config == model.config
    _assert_same_model(model, loaded)


def test_remap_variant_inferred(tmp_path):
    model = _taming_model(remap_used=10)
    used = torch.randperm(32, generator=torch.Generator().manual_seed(3))[:10]
    model.quantize.used.copy_(used)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "remap.ckpt")
    loaded = load_vqgan(tmp_path / "remap.ckpt")
    assert loaded.config.remap_used == 10 and loaded.codebook_size == 10
    assert torch.equal(loaded.quantize.used, used)
    _assert_same_model(model, loaded)


def test_inference_matches_presets():
    """Config inference from the state dict of each preset's structure (levels, blocks,
    attention; narrowed to ch <= 32 to stay fast) gives back the config, up to the nominal
    resolution, which only places attention."""
    from comfyui_sundae.sundae_lib.vqgan_loading import infer_vqgan_config

    configs = []
    for name in VQGANConfig.presets():
        full = VQGANConfig.preset(name)
        configs.append(
            VQGANConfig.preset(name, ch=min(full.ch, 32), n_embed=min(full.n_embed, 256))
        )
    configs.append(VQGANConfig.preset("tiny", resamp_with_conv=False, mid_attention=False))
    configs.append(VQGANConfig.preset("tiny", quantizer="gumbel", remap_used=7))
    for cfg in configs:
        sd = VQGAN(cfg).state_dict()
        fields = infer_vqgan_config(sd)
        assert fields.pop("norm_groups") is None  # not recoverable from weights
        inferred = VQGANConfig(**fields, norm_groups=cfg.norm_groups)
        assert inferred.attn_levels == cfg.attn_levels, cfg
        assert inferred.resolution == max(256, cfg.downsample_factor)
        for field in (
            "ch",
            "ch_mult",
            "num_res_blocks",
            "z_channels",
            "in_channels",
            "out_ch",
            "embed_dim",
            "n_embed",
            "mid_attention",
            "resamp_with_conv",
            "quantizer",
            "remap_used",
            "double_z",
        ):
            assert getattr(inferred, field) == getattr(cfg, field), (cfg, field)


def test_tiny_preset_needs_norm_groups(tmp_path):
    model = perturb(VQGAN(VQGANConfig.preset("tiny")))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "tiny.ckpt")
    with pytest.raises(ValueError, match=r"config=\{'norm_groups'"):
        load_vqgan(tmp_path / "tiny.ckpt")
    _assert_same_model(model, load_vqgan(tmp_path / "tiny.ckpt", config={"norm_groups": 4}))
    verbatim = load_vqgan(tmp_path / "tiny.ckpt", config=VQGANConfig.preset("tiny"))
    assert verbatim.config == model.config


def test_files_without_tensors_are_refused_with_a_remedy(tmp_path):
    """Taming / safetensors files and diffusers weights share the empty-file check; each says
    what to do (a diffusers folder is downloaded, a checkpoint may also be re-exported)."""
    save_file({}, tmp_path / "empty.safetensors")
    torch.save({}, tmp_path / "empty.ckpt")
    (tmp_path / "diff").mkdir()
    save_file({}, tmp_path / "diff" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "diff" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    for name in ("empty.safetensors", "empty.ckpt"):
        with pytest.raises(ValueError, match=r"is empty: it holds no tensors; download or export it again$"):
            load_vqgan(tmp_path / name)
    with pytest.raises(ValueError, match=r"\(diffusers VQModel diffusion_pytorch_model.safetensors\) is "
                       r"empty: it holds no tensors; download it again$"):
        load_vqgan(tmp_path / "diff")


# ---------------------------------------------------------------------------------------------
# sibling yaml
# ---------------------------------------------------------------------------------------------


def _taming_yaml(**changes) -> str:
    dd = dict(double_z=False, z_channels=4, resolution=512, in_channels=3, out_ch=3, ch=32,
              ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[256], dropout=0.0)  # fmt: skip
    params = dict(embed_dim=4, n_embed=32)
    for key, value in changes.items():
        (params if key in params else dd)[key] = value
    yaml = pytest.importorskip("yaml")
    return yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                           "params": {**params, "ddconfig": dd, "lossconfig": {"target": "DummyLoss"}}}})  # fmt: skip


def test_sibling_yaml_agrees(tmp_path):
    model = _taming_model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "vq.ckpt")
    (tmp_path / "vq.yaml").write_text(_taming_yaml())
    loaded = load_vqgan(tmp_path / "vq.ckpt")
    # the yaml's nominal resolution is adopted; attention stays at the same level
    assert (loaded.config.resolution, loaded.config.attn_resolutions) == (512, (256,))
    assert loaded.config.attn_levels == model.config.attn_levels
    _assert_same_model(model, loaded)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ch_mult": [1, 1]}, "ch_mult"),
        ({"n_embed": 64}, "n_embed"),
        ({"attn_resolutions": []}, "attn_resolutions"),
    ],
)
def test_sibling_yaml_disagrees(tmp_path, change, field):
    model = _taming_model()
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "configs").mkdir()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpts" / "last.ckpt")
    (tmp_path / "configs" / "model.yaml").write_text(_taming_yaml(**change))  # taming's layout
    with pytest.raises(ValueError, match=rf"model\.params\.(ddconfig\.)?{field}"):
        load_vqgan(tmp_path / "ckpts" / "last.ckpt")


def test_ldm_yaml_first_stage_without_mid_attention(tmp_path):
    yaml = pytest.importorskip("yaml")
    model = _taming_model(mid_attention=False, attn_resolutions=())
    torch.save(
        {"state_dict": {f"first_stage_model.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "model.ckpt",
    )
    dd = dict(double_z=False, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0, attn_type="none")  # fmt: skip
    first = {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {"embed_dim": 4, "n_embed": 32, "ddconfig": dd},
    }
    doc = {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {"first_stage_config": first},
        }
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    _assert_same_model(model, load_vqgan(tmp_path / "model.ckpt"))
    dd["attn_type"] = "vanilla"  # now the yaml claims a mid attention the weights lack
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="attn_type"):
        load_vqgan(tmp_path / "model.ckpt")


# ---------------------------------------------------------------------------------------------
# native files and hf://
# ---------------------------------------------------------------------------------------------


def test_native_round_trip_and_override(tmp_path):
    model = perturb(VQGAN(VQGANConfig.preset("tiny")))
    path = save_vqgan(model, tmp_path / "tiny.safetensors")
    loaded = load_vqgan(path)
    assert loaded.config == model.config
    _assert_same_model(model, loaded)
    override = load_vqgan(path, config={"pixel_range": "0,1"})
    assert override.config.pixel_range == "0,1"
    assert torch.equal(override.quant_conv.weight, model.quant_conv.weight)
    with pytest.raises(ValueError, match="unknown key"):
        load_vqgan(path, config={"pixel_rnage": "0,1"})


def test_hf_source_from_offline_cache(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    dm = _diffusers_vq()
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-vq"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    dm.save_pretrained(repo / "snapshots" / revision / "vqvae")
    taming = _taming_model()
    (repo / "snapshots" / revision / "ckpts").mkdir()
    torch.save(
        {"state_dict": taming.state_dict()}, repo / "snapshots" / revision / "ckpts" / "last.ckpt"
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_equivalent(dm, load_vqgan("hf://someone/tiny-vq/vqvae"), _images())
    _assert_equivalent(dm, load_vqgan("hf://someone/tiny-vq"), _images())  # pipeline root
    _assert_same_model(taming, load_vqgan("hf://someone/tiny-vq/ckpts/last.ckpt"))
    with pytest.raises(FileNotFoundError, match="offline"):
        load_vqgan("hf://someone/not-cached/vqvae")
    with pytest.raises(FileNotFoundError, match="offline"):
        load_vqgan("hf://someone/not-cached/model.ckpt")
