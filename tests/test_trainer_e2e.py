"""sundae-train end to end on tiny data through click's CliRunner: prior on pixels, the
VQ-GAN -> latents -> prior pipeline, sample / inpaint, shipped-model errors, env."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tomllib
import torch
from click.testing import CliRunner
from comfyui_sundae.sundae_lib import load_prior, load_vqgan
from comfyui_sundae.sundae_lib._helpers import file_sha256, load_safetensors
from comfyui_sundae.trainer import sample_cmd
from comfyui_sundae.trainer.cli import main
from PIL import Image
from safetensors import safe_open

QUIET = ["--set", "run.progress=false", "--set", "run.tensorboard=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(args):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def _meta(path):
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory, mnist):
    """100 real digits (10 per class), 2x2-average-pooled and cropped to 8x8."""
    images, labels = mnist
    idx = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(10)])
    x = images[idx].astype(np.float32)[:, 2:26, 2:26]  # 24x24
    x = x.reshape(-1, 8, 3, 8, 3).mean(axis=(2, 4))
    path = tmp_path_factory.mktemp("mnist") / "tiny.npz"
    np.savez(path, images=x.round().astype(np.uint8), labels=labels[idx])
    return path


def test_prior_on_pixels_then_sample_and_inpaint(tmp_path, tiny_mnist):
    out = tmp_path / "run"
    args = [
        "prior", "--set", "model=tiny", "--set", f"data.path={tiny_mnist}", "--set", "data.eval_fraction=0.1",
        "--set", "codec.levels=16", "--set", "optim.batch_size=8", "--set", "optim.lr=3e-3",
        "--set", "loss.region_corruption=0.5", "--set", "sampling.steps=4", "--set", "sampling.num_samples=4",
        "--set", "run.log_every=2", "--set", "run.eval_every=2", "--set", "run.checkpoint_every=2",
        "--set", "run.sample_every=4", "--set", "run.keep_last=1", "--max-steps", "4", "--out", str(out), *QUIET,
    ]
    _invoke(args)
    export = out / "model.safetensors"
    prior = load_prior(export)
    assert prior.config.codebook_size == 16 and tuple(prior.config.grid) == (8, 8) and prior.config.num_classes == 10
    meta = _meta(export)
    assert meta["sundae.codec"] == "pixel:levels=16,channels=1"
    assert json.loads(meta["sundae.label_map"]) == [str(k) for k in range(10)]
    assert json.loads(meta["sundae.sampling"])["steps"] == 4

    # checkpoints: zero-padded folders, pruned to the last one (+ best), unwrapped EMA export
    ck = out / "checkpoints"
    steps = sorted(p.name for p in ck.glob("step-*"))
    best = json.loads((ck / "best.json").read_text())
    assert "step-00000004" in steps and set(steps) <= {"step-00000004", best["folder"]}
    last = ck / "step-00000004"
    exported = load_safetensors(export)
    ema = load_safetensors(last / "ema.safetensors")
    raw = load_safetensors(last / "model.safetensors")
    assert exported.keys() == raw.keys() and not any(k.startswith(("module.", "_orig_mod.")) for k in raw)
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    state = torch.load(last / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and state["order"]["batch"] >= 1 and "loss" in state["rng"][0]["generators"]
    record = json.loads((last / "checkpoint.json").read_text())
    assert record["complete"] and record["step"] == 4 and record["argv"] and record["version"]
    cfg = tomllib.loads((last / "config.toml").read_text())
    assert cfg["model"]["codebook_size"] == 16 and cfg["run"]["max_steps"] == 4 and cfg["codec"]["levels"] == 16

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4] and all(np.isfinite(r["train/loss"]) for r in train)
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]
    split = json.loads((out / "split.json").read_text())
    assert split["eval_items"] == 10 and split["train_items"] == 90
    with Image.open(out / "samples" / "step-00000004.png") as im:
        assert im.size == (2 + 2 * 10, 2 + 2 * 10)  # 4 samples of 8x8 in a 2x2 grid, 2 px gaps

    # sample: the pixel codec comes from the prior's metadata
    grid_png = tmp_path / "s.png"
    _invoke(["sample", "-m", str(export), "-n", "3", "--steps", "3", "--class", "3", "--out", str(grid_png)])
    with Image.open(grid_png) as im:
        assert im.size == (2 + 2 * 10, 2 + 2 * 10) and im.mode == "L"
    res = CliRunner().invoke(main, ["sample", "-m", str(export), "--class", "12", "--out", str(grid_png)])
    assert res.exit_code == 1 and "10 classes; use a class id 0..9" in res.output

    # inpaint: white = regenerate; the kept half survives exactly (quantised to 16 levels)
    digit = (np.load(tiny_mnist)["images"][5]).astype(np.uint8)
    Image.fromarray(digit).save(tmp_path / "digit.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    folder = tmp_path / "inpainted"
    _invoke(["inpaint", "-m", str(export), "-i", str(tmp_path / "digit.png"), "--mask", str(tmp_path / "mask.png"),
             "-n", "2", "--steps", "3", "--no-composite", "--class", "5", "--out", str(folder)])
    outs = sorted(folder.glob("*.png"))
    assert len(outs) == 2
    quantised = np.round(np.round(digit / 255 * 15) / 15 * 255)
    for path in outs:
        got = np.asarray(Image.open(path), dtype=np.float64)
        assert got.shape == (8, 8)
        assert np.abs(got[:, :4] - quantised[:, :4]).max() <= 1


def _image_folder(root):
    rng = np.random.default_rng(0)
    for c in ("0", "2", "10"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            base = np.zeros((16, 16, 3), np.uint8)
            base[:, : 4 + 3 * i] = 200
            noise = (rng.random((16, 16, 3)) * 40).astype(np.uint8)
            Image.fromarray(base + noise).save(root / c / f"{i}.png")
    (root / "2" / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


def test_vqgan_latents_prior_pipeline(tmp_path):
    images = _image_folder(tmp_path / "imgs")
    vq_out = tmp_path / "vqgan"  # beside prior/: the layout the presets use, where sample finds it
    _invoke([
        "vqgan", "--set", "model=tiny", "--set", f"data.path={images}", "--set", "data.eval_fraction=0.2",
        "--set", "loss.disc_start=1", "--set", "loss.disc_num_layers=1", "--set", "loss.disc_ndf=8",
        "--set", "loss.codebook_remedy=restart", "--set", "optim.batch_size=4", "--set", "run.log_every=1",
        "--set", "run.eval_every=2", "--set", "run.sample_every=2", "--set", "run.recon_images=3",
        "--set", "run.export=vq.safetensors", "--max-steps", "2", "--out", str(vq_out), *QUIET,
    ])
    vq_file = vq_out / "vq.safetensors"
    vqgan = load_vqgan(str(vq_file))
    assert vqgan.downsample_factor == 2 and vqgan.codebook_size == 32
    rows = [json.loads(line) for line in (vq_out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/disc_loss" in r for r in rows) and any("train/rec_loss" in r for r in rows)
    assert any("eval/codebook_usage" in r for r in rows)
    with Image.open(vq_out / "samples" / "recon-00000002.png") as im:
        assert im.size == (2 + 3 * 18, 2 + 2 * 18)  # originals over reconstructions
    state = torch.load(vq_out / "checkpoints" / "step-00000002" / "training_state.pt", weights_only=True)
    assert any(k.startswith("discriminator.") for k in state["loss_state"])

    # latents: flipped twins adjacent, uint16, tokens equal an independent encode
    lat = tmp_path / "lat"
    lat_args = ["latents", "--vqgan", str(vq_file), "--data", str(images), "--out", str(lat), "--flip",
                "--set", "shard_size=5", "--set", "batch_size=3"]
    _invoke(lat_args)
    manifest = json.loads((lat / "manifest.json").read_text())
    assert manifest["complete"] and manifest["entries"] == 24 and manifest["skipped_images"] == 1
    assert manifest["label_map"] == ["0", "2", "10"] and manifest["grid"] == [8, 8]
    assert manifest["vqgan"]["sha256"] == file_sha256(vq_file)
    shards = [np.load(lat / name) for name in manifest["shards"]]
    tokens = np.concatenate([s["tokens"] for s in shards])
    ids = np.concatenate([s["ids"] for s in shards])
    flipped = np.concatenate([s["flipped"] for s in shards])
    labels = np.concatenate([s["labels"] for s in shards])
    assert tokens.dtype == np.uint16 and len(shards) == 3
    assert np.array_equal(ids[0::2], ids[1::2]) and not flipped[0::2].any() and flipped[1::2].all()
    files = sorted((p for p in images.rglob("*.png") if p.name != "broken.png"), key=lambda p: p.relative_to(images).as_posix())
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) for f in files]) / 127.5 - 1
    ref = vqgan.encode(x).numpy()
    ref_flip = vqgan.encode(x.flip(-1)).numpy()
    assert np.array_equal(tokens[0::2], ref) and np.array_equal(tokens[1::2], ref_flip)
    assert [manifest["label_map"][k] for k in labels[0::2]] == [f.relative_to(images).parts[0] for f in files]

    # resumable: a finished shard is kept, a missing one is rebuilt identically
    before = (lat / "shard-00000.npz").stat().st_mtime_ns
    removed = (lat / "shard-00001.npz").read_bytes()
    (lat / "shard-00001.npz").unlink()
    _invoke(lat_args)
    assert (lat / "shard-00000.npz").stat().st_mtime_ns == before
    again = np.load(lat / "shard-00001.npz")
    assert np.array_equal(again["tokens"], shards[1]["tokens"]) and len(removed) > 0
    res = CliRunner().invoke(main, [*lat_args[:-4], "--set", "shard_size=4"])
    assert res.exit_code == 1 and "different settings" in res.output

    # prior on the latents, then sample with the VQ-GAN found through the prior's metadata
    pr_out = tmp_path / "prior"
    _invoke(["prior", "--set", "model=tiny", "--set", f"data.path={lat}", "--set", "data.flip=true",
             "--set", "optim.batch_size=4", "--set", "sampling.steps=2", "--set", "sampling.num_samples=3",
             "--max-steps", "2", "--out", str(pr_out), *QUIET])
    meta = _meta(pr_out / "model.safetensors")
    assert meta["sundae.codec"] == f"vqgan:sha256={file_sha256(vq_file)},factor=2,channels=3"
    assert meta["sundae.vqgan_file"] == "vq.safetensors"
    assert "sundae.vqgan_source" not in meta  # a local path is this machine's: never recorded
    assert json.loads(meta["sundae.label_map"]) == ["0", "2", "10"]
    assert (pr_out / "samples" / "step-00000002.png").is_file()
    png = tmp_path / "from-latents.png"
    _invoke(["sample", "-m", str(pr_out / "model.safetensors"), "-n", "2", "--steps", "2", "--class", "10", "--out", str(png)])
    with Image.open(png) as im:
        assert im.size == (2 + 2 * 18, 2 + 18) and im.mode == "RGB"
    _invoke(["inpaint", "-m", str(pr_out / "model.safetensors"), "-i", str(files[0]), "--box", "0,0,8,16",
             "-n", "2", "--steps", "2", "--out", str(tmp_path / "inp.png")])
    with Image.open(tmp_path / "inp.png") as im:
        assert im.size == (2 + 4 * 18, 2 + 18)  # original, mask, 2 results

    # a latent set whose encoding was interrupted is refused with a fix
    manifest["complete"] = False
    (lat / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(main, ["prior", "--set", f"data.path={lat}", "--set", "model=tiny", "--out", str(tmp_path / "x"), *QUIET])
    assert res.exit_code == 1 and "incomplete" in res.output and "rerun" in res.output


def test_shipped_models_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_cmd, "SHIPPED", tmp_path / "shipped_models")
    res = CliRunner().invoke(main, ["sample", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "shipped prior 'mnist-vq' is missing" in res.output and "mnist-vq.safetensors" in res.output
    res = CliRunner().invoke(main, ["inpaint", "--model", "mnist-pixels", "-i", __file__.replace(".py", ".py"), "--box", "0,0,1,1"])
    assert res.exit_code == 1 and "shipped prior 'mnist-pixels' is missing" in res.output
    res = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "nope.safetensors")])
    assert res.exit_code == 1 and "no such file" in res.output
    res = CliRunner().invoke(main, ["inpaint", "-i", __file__])
    assert res.exit_code == 2 and "exactly one of --mask" in res.output


def test_shipped_defaults_resolve_to_package_files():
    """With no --model the shipped mnist-vq prior is used; its VQ-GAN comes from shipped_models."""
    assert sample_cmd.SHIPPED == sample_cmd.PACKAGE_ROOT / "shipped_models"
    if (sample_cmd.SHIPPED / "sundae" / "mnist-vq.safetensors").is_file():
        assert sample_cmd.resolve_model_path(None).endswith("shipped_models/sundae/mnist-vq.safetensors")
    else:
        with pytest.raises(FileNotFoundError, match="shipped prior 'mnist-vq'"):
            sample_cmd.resolve_model_path(None)


def test_env_command():
    res = _invoke(["env"])
    for word in ("python", "torch", "cuda", "einops", "safetensors", "bf16"):
        assert word in res.output
    assert torch.__version__ in res.output
