"""Node inputs that used to fail with raw Python / torch errors, and the model-folder listing:
each bad input is refused with a message that names the value, what is allowed and what to do;
the listing survives symlink loops and IS_CHANGED stats files instead of walking trees."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from comfyui_sundae.nodes import NODE_CLASS_MAPPINGS, comfy_adapter, loaders
from comfyui_sundae.nodes.types import CodecHandle, PriorHandle, TokenBatch
from comfyui_sundae.sundae_lib import save_prior
from conftest import CPU, run_sampler, small_vqgan, tiny_prior

Encode, Sampler = NODE_CLASS_MAPPINGS["SundaeEncode"], NODE_CLASS_MAPPINGS["SundaeSampler"]
LoadVQGAN, LoadPrior = NODE_CLASS_MAPPINGS["SundaeLoadVQGAN"], NODE_CLASS_MAPPINGS["SundaeLoadPrior"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prior():
    model = tiny_prior(seed=0, codebook_size=256, grid=(4, 4))
    return PriorHandle(model, "prior.safetensors", CPU, torch.float32, codec="vqgan:factor=4", factor=4)


def test_strength_widget_starts_above_zero_and_zero_is_explained(prior):
    options = Sampler.INPUT_TYPES()["required"]["strength"][1]
    assert 0 < options["min"] <= 0.01 and options["max"] == 1.0
    tokens = TokenBatch(tokens=torch.zeros(1, 4, 4, dtype=torch.long), mask=None, factor=4)
    with pytest.raises(ValueError, match=r"SundaeSampler: strength 0.0 is outside 0.01..1 — set 1"):
        run_sampler(prior, strength=0.0, tokens=tokens)


def test_strength_below_one_without_tokens_names_the_node_input(prior):
    with pytest.raises(ValueError, match=r"strength 0.5 makes variations.*no tokens are connected.*'tokens' input") as info:
        run_sampler(prior, strength=0.5)
    assert "init_tokens" not in str(info.value)  # a library argument means nothing in the graph
    assert run_sampler(prior, strength=1.0).tokens.shape == (1, 4, 4)


def test_factor_zero_in_metadata_is_ignored_not_a_division_by_zero(tmp_path, monkeypatch):
    assert loaders.factor_from_codec_metadata("vqgan:sha256=ab,factor=0") is None
    assert loaders.factor_from_codec_metadata("vqgan:sha256=ab,factor=8") == 8
    monkeypatch.setattr(comfy_adapter, "_fallback_folders", {"sundae": [str(tmp_path)], "vqgan": []})
    model = tiny_prior(seed=None, codebook_size=256, grid=(4, 4))
    save_prior(model, tmp_path / "p.safetensors", metadata={"sundae.codec": "vqgan:sha256=ab,factor=0"})
    (handle,) = LoadPrior().load("p.safetensors", "fp32")
    assert handle.factor is None
    with pytest.raises(ValueError, match=r"width/height are in pixels.*connect the VQ-GAN"):
        run_sampler(handle, width=32, height=32)
    assert run_sampler(handle).tokens.shape == (1, 4, 4)  # the trained grid needs no factor


def test_empty_image_batch_is_explained():
    vq = CodecHandle(small_vqgan(seed=None), "vq.safetensors", CPU, torch.float32)
    for shape in ((0, 16, 16, 3), (1, 0, 16, 3)):
        with pytest.raises(ValueError, match=r"SundaeEncode: the IMAGE is empty \(shape \[B, H, W, C\] = \[.*at least one image"):
            Encode().encode(vq, torch.zeros(shape))


# ---------------------------------------------------------------------------------------------
# model folders
# ---------------------------------------------------------------------------------------------


def _list_within(name: str, seconds: float) -> list[str]:
    result: list = []
    worker = threading.Thread(target=lambda: result.append(comfy_adapter.list_model_files(name)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"listing the '{name}' folder did not finish within {seconds} s"
    return result[0]


def test_symlink_loops_do_not_hang_the_dropdown(tmp_path, monkeypatch):
    root = tmp_path / "sundae"
    (root / "sub").mkdir(parents=True)
    (root / "p.safetensors").write_bytes(b"")
    (root / "sub" / "q.safetensors").write_bytes(b"")
    # two loops per folder: os.walk(followlinks=True) would visit 2^40 paths
    os.symlink(root, root / "again")
    os.symlink(root, root / "sub" / "up")
    os.symlink("..", root / "sub" / "parent")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.safetensors").write_bytes(b"")
    os.symlink(elsewhere, root / "shared")  # a plain symlinked folder is still followed
    monkeypatch.setattr(comfy_adapter, "_fallback_folders", {"sundae": [str(root)]})
    files = _list_within("sundae", 20)
    assert files == ["p.safetensors", "shared/linked.safetensors", "sub/q.safetensors"]


def test_listing_depth_is_bounded(tmp_path, monkeypatch):
    deep = tmp_path / "vqgan"
    for _ in range(comfy_adapter.MAX_WALK_DEPTH + 3):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "deep.safetensors").write_bytes(b"")
    (tmp_path / "vqgan" / "top.safetensors").write_bytes(b"")
    monkeypatch.setattr(comfy_adapter, "_fallback_folders", {"vqgan": [str(tmp_path / "vqgan")]})
    assert _list_within("vqgan", 20) == ["top.safetensors"]


def test_is_changed_stats_the_model_files_not_the_tree(tmp_path, monkeypatch):
    folder = tmp_path / "vqgan" / "my-vq"
    (folder / "samples" / "many").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (folder / "samples" / "many" / "x.png").write_bytes(b"a")
    monkeypatch.setattr(comfy_adapter, "_fallback_folders", {"vqgan": [str(tmp_path / "vqgan")]})

    def no_walks(*args, **kwargs):
        raise AssertionError("IS_CHANGED must not walk a folder tree")

    monkeypatch.setattr(Path, "rglob", no_walks)
    monkeypatch.setattr(os, "walk", no_walks)
    first = LoadVQGAN.IS_CHANGED("my-vq/", "auto")
    (folder / "samples" / "many" / "x.png").write_bytes(b"changed")  # not read by a load
    assert LoadVQGAN.IS_CHANGED("my-vq/", "auto") == first
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"new weights")
    assert LoadVQGAN.IS_CHANGED("my-vq/", "auto") != first
