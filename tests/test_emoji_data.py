"""The emoji dataset: builder on synthetic npm-shaped packages (no network), integrity and sha256
checks, compositing over white, the split by base emoji, ``sundae-train data emoji``, the
emoji-vq preset and a two-step VQ-GAN run on the committed real subset."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from comfyui_sundae.trainer import config as C
from comfyui_sundae.trainer import emoji as E
from comfyui_sundae.trainer.cli import main
from PIL import Image

# (short_name, category, colour, skin tones, has a twitter image)
ENTRIES = [
    ("grinning", "Smileys & Emotion", (250, 200, 0), (), True),
    ("joy", "Smileys & Emotion", (240, 180, 20), (), True),
    ("santa", "People & Body", (200, 0, 0), ("1F3FB", "1F3FC"), True),
    ("wave", "People & Body", (230, 170, 120), (), True),
    ("skin-tone-2", "Component", (250, 220, 190), (), True),  # dropped
    ("dog", "Animals & Nature", (140, 90, 40), (), True),
    ("pizza", "Food & Drink", (230, 140, 30), (), False),  # google only
    ("flag-nz", "Flags", (0, 0, 120), (), True),
]
CODES = {name: f"1F6{i:02X}" for i, (name, *_) in enumerate(ENTRIES)}  # santa = 1F602


def _png(rgba, *, size=64, mode="RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), rgba).save(buf, "PNG")
    return buf.getvalue()


def _make_package(root, style):
    """A folder shaped like an unpacked emoji-datasource-<style> package (``package/...``)."""
    pkg = root / "package"
    img = pkg / "img" / style / "64"
    img.mkdir(parents=True)
    entries = []
    for name, category, colour, tones, has_twitter in ENTRIES:
        has = style == "google" or has_twitter
        code = CODES[name]
        e = {"short_name": name, "unified": code, "image": f"{code.lower()}.png", "category": category,
             f"has_img_{style}": has}
        if has:
            (img / e["image"]).write_bytes(_png((*colour, 128)))  # half-transparent
        if tones:
            e["skin_variations"] = {}
            for k, tone in enumerate(tones):
                unified = f"{code}-{tone}"
                e["skin_variations"][tone] = {"unified": unified, "image": f"{unified.lower()}.png", f"has_img_{style}": True}
                (img / f"{unified.lower()}.png").write_bytes(_png((colour[0], 40 * k, 0, 255)))
        entries.append(e)
    (pkg / "emoji.json").write_text(json.dumps(entries))
    return root


def _tgz(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / "package", arcname="package")
    return path


@pytest.fixture
def packages(tmp_path):
    return {s: _make_package(tmp_path / f"pkg-{s}", s) for s in E.STYLES}


def _load(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------------
# the builder
# ----------------------------------------------------------------------------------------------


def test_build_from_folders(tmp_path, packages):
    out = tmp_path / "out"
    manifest = E.build_emoji(out, packages=packages)
    train, test = _load(out / E.TRAIN_FILE), _load(out / E.TEST_FILE)
    keys = {"images", "labels", "label_names", "short_names", "bases", "styles", "unified"}
    assert set(train) == set(test) == keys
    # 7 bases + 2 tones per style, no Component, no twitter pizza: 9 google + 8 twitter
    both = {k: np.concatenate([train[k], test[k]]) for k in keys - {"label_names"}}
    assert len(both["images"]) == 17 and both["images"].shape[1:] == (64, 64, 3)
    assert both["images"].dtype == np.uint8 and both["labels"].dtype == np.int64
    assert list(train["label_names"]) == list(E.CATEGORIES)
    assert "skin-tone-2" not in set(both["bases"])
    category = {name: cat for name, cat, *_ in ENTRIES}
    for short, base, label in zip(both["short_names"], both["bases"], both["labels"], strict=True):
        assert short.split("::")[0] == base and E.CATEGORIES[label] == category[base]
    santa = sorted(s for s, st in zip(both["short_names"], both["styles"], strict=True) if st == "google" and s.startswith("santa"))
    assert santa == ["santa", "santa::skin-tone-2", "santa::skin-tone-3"]
    assert "1F602-1F3FB" in set(both["unified"])
    assert list(both["styles"]).count("google") == 9 and list(both["styles"]).count("twitter") == 8
    assert "pizza" not in set(both["bases"][both["styles"] == "twitter"])
    # the split: one of two bases held out in the 2-base categories, whole bases on one side
    assert not set(train["bases"]) & set(test["bases"])
    held = set(test["bases"])
    assert len(held & {"grinning", "joy"}) == 1 and len(held & {"santa", "wave"}) == 1 and len(held) == 2
    # composited over white: a half-transparent colour lies between it and white
    i = list(both["short_names"]).index("flag-nz")
    assert np.abs(both["images"][i].astype(int) - [127, 127, 187]).max() <= 1
    # the manifest tells the truth about the files
    assert manifest == json.loads((out / "manifest.json").read_text())
    for name, arrays in ((E.TRAIN_FILE, train), (E.TEST_FILE, test)):
        info = manifest["files"][name]
        assert info["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert info["images"] == len(arrays["images"]) and sum(info["per_category"].values()) == info["images"]
        assert info["per_category"]["People & Body"] == int((arrays["labels"] == 1).sum())
    assert manifest["held_out"] == {"by": "base emoji", "fraction": 0.1, "seed": 0, "bases": 2}
    assert not any(p["checked"] for p in manifest["packages"].values())  # folders are not checked
    assert "Apache" in manifest["packages"]["google"]["licence"] and "CC-BY 4.0" in manifest["packages"]["twitter"]["licence"]
    # reproducible: a second build writes the same bytes
    E.build_emoji(tmp_path / "again", packages=packages)
    for name in (E.TRAIN_FILE, E.TEST_FILE):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_tarballs_are_checked(tmp_path, packages, monkeypatch):
    tgz = {s: _tgz(packages[s], tmp_path / f"{s}.tgz") for s in E.STYLES}
    with pytest.raises(ValueError, match=re.escape("google.tgz") + ".*fails its integrity check"):
        E.build_emoji(tmp_path / "bad", packages=tgz)
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    # pin our tarballs: they are read like the folders, then the pinned sha256 check runs
    for s in E.STYLES:
        monkeypatch.setitem(E.PACKAGES, s, (*E.PACKAGES[s][:2], E.integrity_of(tgz[s])))
    with pytest.raises(ValueError, match="the pinned build has " + E.EXPECTED_SHA256[E.TRAIN_FILE]):
        E.build_emoji(tmp_path / "pinned", packages=tgz)
    manifest = json.loads((tmp_path / "pinned" / "manifest.json").read_text())  # written anyway
    assert all(p["checked"] for p in manifest["packages"].values())
    E.build_emoji(tmp_path / "unchecked", packages=tgz, check_sha256=False)
    E.build_emoji(tmp_path / "folders", packages=packages)
    for name in (E.TRAIN_FILE, E.TEST_FILE):  # a tarball and its folder give the same files
        assert (tmp_path / "unchecked" / name).read_bytes() == (tmp_path / "folders" / name).read_bytes()


def test_bad_inputs(tmp_path, packages, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        E.build_emoji(tmp_path / "o", packages={"google": tmp_path / "nope"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no emoji.json"):
        E.build_emoji(tmp_path / "o", packages={"google": tmp_path / "empty"})
    with pytest.raises(ValueError, match="unknown emoji style"):
        E.build_emoji(tmp_path / "o", packages={"apple": packages["google"]})
    with pytest.raises(ValueError, match="must be in"):
        E.build_emoji(tmp_path / "o", packages=packages, fraction=1.0)
    monkeypatch.setattr(E.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="needs 'npm'"):
        E.build_emoji(tmp_path / "o", packages={"google": packages["google"]}, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------
# compositing
# ----------------------------------------------------------------------------------------------


def test_composite_over_white():
    img = Image.new("RGBA", (64, 64), (10, 20, 30, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    img.putpixel((2, 0), (255, 0, 0, 128))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = E.composite_over_white(buf.getvalue())
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [255, 255, 255] and out[5, 5].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    # red at alpha a = 128/255 over white: 255·a + 255·(1 − a) = 255; 0·a + 255·(1 − a) = 127
    assert np.abs(out[0, 2].astype(int) - [255, 127, 127]).max() <= 1

    assert (E.composite_over_white(_png(100, mode="L")) == 100).all()
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    pal.putpixel((3, 3), 1)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    out = E.composite_over_white(buf.getvalue())
    assert out[0, 0].tolist() == [255, 255, 255] and out[3, 3].tolist() == [0, 128, 255]
    for size in (32, 72, 128):  # resized to 64
        out = E.composite_over_white(_png((0, 200, 100, 255), size=size))
        assert out.shape == (64, 64, 3) and np.abs(out.astype(int) - [0, 200, 100]).max() <= 1


# ----------------------------------------------------------------------------------------------
# the split
# ----------------------------------------------------------------------------------------------


def _images(bases_per_category):
    out = []
    for cat, n in bases_per_category.items():
        for b in range(n):
            base = f"{cat[:4]}{b:02d}"
            for style in E.STYLES:
                for short in (base, base + "::skin-tone-2"):
                    out.append(E.EmojiImage("X", base, short, cat, style, b""))
    return out


def test_held_out_bases():
    images = _images({"Animals & Nature": 30, "Flags": 5, "Objects": 1, "Symbols": 12})
    held = E.held_out_bases(images)
    per = {cat: {b for b in held if b.startswith(cat[:4])} for cat in ("Anim", "Flag", "Obje", "Symb")}
    assert len(per["Anim"]) == 3  # round(0.1 · 30)
    assert len(per["Flag"]) == 1  # round(0.5) = 0, but every category with > 1 base holds one out
    assert len(per["Obje"]) == 0  # a single base stays in training
    assert len(per["Symb"]) == 1
    shuffled = list(images)
    random.Random(1).shuffle(shuffled)
    assert E.held_out_bases(shuffled) == held  # independent of input order
    assert E.held_out_bases(images, seed=1) != held
    assert len(E.held_out_bases(images, fraction=0.5)) == 15 + 2 + 0 + 6  # round(2.5) = 2
    assert len(E.held_out_bases(images, fraction=0.99)) == 29 + 4 + 0 + 11  # training keeps one
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="must be in"):
            E.held_out_bases(images, fraction=bad)


# ----------------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------------


def test_cli_data_emoji(tmp_path, packages, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(main, ["--log-level", "warning", "data", "emoji", "--out", str(out),
                               "--packages", f"google={packages['google']}", "--packages", f"twitter={packages['twitter']}"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    for info in manifest["files"].values():
        assert info["sha256"] in res.output
    assert "Apache License 2.0" in res.output and "CC-BY 4.0" in res.output and "not integrity-checked" in res.output
    train, test = (manifest["files"][n]["per_category"]["People & Body"] for n in (E.TRAIN_FILE, E.TEST_FILE))
    assert sorted([train, test]) == [2, 6] and f"People & Body {train}/{test}" in res.output  # wave | santa + 2 tones
    assert "Traceback" not in res.output

    def one_line_error(args, code=1):
        r = runner.invoke(main, ["--log-level", "warning", "data", "emoji", *args])
        assert r.exit_code == code and "Traceback" not in r.output, r.output
        lines = r.output.strip().splitlines()
        if code == 1:  # a bad input: one line
            assert len(lines) == 1, r.output
        assert lines[-1].startswith("Error: "), r.output  # a usage error: usage, hint, error
        return lines[-1]

    assert "does not exist" in one_line_error(["--out", str(tmp_path / "x"), "--packages", f"google={tmp_path / 'nope'}"])
    assert "no emoji.json" in one_line_error(["--out", str(tmp_path / "x"), "--packages", f"google={tmp_path}"])
    bad = _tgz(packages["google"], tmp_path / "g.tgz")
    assert "fails its integrity check" in one_line_error(["--out", str(tmp_path / "x"), "--packages", f"google={bad}"])
    assert "STYLE=PATH" in one_line_error(["--out", str(tmp_path / "x"), "--packages", "google"], code=2)
    assert "fraction" in one_line_error(["--out", str(tmp_path / "x"), "--fraction", "1.5"], code=2)
    monkeypatch.setattr(E.shutil, "which", lambda name: None)
    assert "needs 'npm'" in one_line_error(["--out", str(tmp_path / "x"), "--cache", str(tmp_path / "cache")])


def test_cli_help_mentions_emoji():
    res = CliRunner().invoke(main, ["--help"])
    assert "sundae-train data emoji --out data/emoji" in res.output and "--config emoji-vq" in res.output
    res = CliRunner().invoke(main, ["data", "emoji", "--help"])
    assert res.exit_code == 0 and "--packages" in res.output and "--no-check" in res.output


# ----------------------------------------------------------------------------------------------
# the preset and a real two-step run
# ----------------------------------------------------------------------------------------------


def test_emoji_preset_validates():
    from comfyui_sundae.sundae_lib import PriorConfig, VQGANConfig
    from comfyui_sundae.sundae_lib.vq_losses import VQLossConfig

    assert "emoji-vq" in C.preset_names()
    doc = C.read_config_file(C.find_config_file("emoji-vq"))
    vq, _ = C.load_stage("vqgan", "emoji-vq", [])
    name, overrides = C.validate_model_table(vq.model, VQGANConfig)
    mcfg = VQGANConfig.preset(name, **overrides) if name else VQGANConfig.from_dict(overrides)
    assert mcfg.resolution == 64 and mcfg.in_channels == 3 and mcfg.out_ch == 3
    VQLossConfig.from_dict(vq.loss)
    assert vq.data.path == "data/emoji/emoji_train.npz"
    if "latents" in doc:
        lat, _ = C.load_stage("latents", "emoji-vq", [])
        assert lat.vqgan.endswith(vq.run.out_dir.split("/")[-1] + "/" + vq.run.export)
        assert lat.data.path == vq.data.path
    if "prior" in doc:
        pr, _ = C.load_stage("prior", "emoji-vq", [])
        pname, poverrides = C.validate_model_table(pr.model, PriorConfig)
        if pname:
            PriorConfig.preset(pname, **poverrides)
        if "latents" in doc:
            assert pr.data.path == lat.out_dir


def test_subset_file_matches_the_full_dataset_layout(repo_root):
    path = repo_root / "data" / "emoji_subset.npz"
    assert path.stat().st_size < 300_000
    data = _load(path)
    assert set(data) == {"images", "labels", "label_names", "short_names", "bases", "styles", "unified"}
    assert data["images"].shape == (36, 64, 64, 3) and data["images"].dtype == np.uint8
    assert list(data["label_names"]) == list(E.CATEGORIES)
    assert np.bincount(data["labels"], minlength=9).tolist() == [4] * 9
    assert list(data["styles"]) == ["google", "twitter"] * 18
    assert (data["short_names"] == data["bases"]).all()
    # real artwork composited over white: some pure-white background, some drawing, in each
    pixels = data["images"].reshape(36, -1, 3)
    assert ((pixels == 255).all(axis=-1).mean(axis=1) > 0.05).all()
    assert (pixels.std(axis=1).max(axis=1) > 5).all()


def test_vqgan_two_steps_on_emoji_subset(tmp_path, repo_root):
    """The preset's model and losses (only the schedule shortened) train on real emoji; the GAN
    term starts at step 2 (``disc_start=1``: the second update)."""
    from comfyui_sundae.sundae_lib import load_vqgan

    out = tmp_path / "vq"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sets = [
            f"data.path={repo_root / 'data' / 'emoji_subset.npz'}", "data.eval_fraction=0.1",
            "loss.disc_start=1", "optim.batch_size=4",
            "run.max_steps=2", "run.precision=fp32", "run.log_every=1", "run.eval_every=2",
            "run.eval_batches=1", "run.sample_every=2", "run.recon_images=2", "run.checkpoint_every=2",
            "run.progress=false", "run.tensorboard=false", f"run.out_dir={out}",
        ]
        args = ["vqgan", "--config", "emoji-vq"] + [x for s in sets for x in ("--set", s)]
        res = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(n)
    assert res.exit_code == 0, res.output
    vq = load_vqgan(str(out / "emoji-vq.safetensors"))  # the preset's model, unchanged
    assert vq.downsample_factor == 4 and vq.codebook_size == 512 and vq.config.in_channels == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "train/rec_loss" in r}
    assert sorted(train) == [1, 2]
    assert "train/disc_loss" not in train[1] and np.isfinite(train[2]["train/disc_loss"])  # disc_start=1
    assert any("eval/rec_loss" in r for r in rows)
