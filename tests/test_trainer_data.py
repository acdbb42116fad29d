"""sundae-train data layer: folders and .npz arrays, numeric class order (B11), unreadable files,
deterministic splits that keep flipped twins together (B10), exact batch order across resumes.
The bug tags are the official code's, listed in docs/official-code.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_sundae.trainer.config import DataConfig
from comfyui_sundae.trainer.data import BatchOrder, make_split, open_images, sort_class_names
from comfyui_sundae.trainer.sample_cmd import _load_image
from PIL import Image


def _write_folder(root, classes=("0", "2", "10"), per_class=3, size=(12, 10)):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c / "deeper").mkdir(parents=True)
        for i in range(per_class):
            sub = root / c / ("deeper" if i == 0 else "")
            Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(sub / f"img{i}.png")
    return root


def test_class_names_sort_numerically_when_numbers():
    assert sort_class_names(["10", "2", "0", "1"]) == ["0", "1", "2", "10"]  # not "0", "1", "10", "2"
    assert sort_class_names(["dog", "cat", "10"]) == ["10", "cat", "dog"]


def test_folder_labels_from_first_level_numeric_order(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    (root / "2" / "broken.png").write_bytes(b"not a png")
    (root / "10" / "notes.txt").write_text("ignored")
    ds = open_images(DataConfig(path=str(root)))
    assert ds.label_map == ["0", "2", "10"]
    assert len(ds) == 9 and len(ds.skipped) == 1 and "broken.png" in ds.skipped[0]
    # files are sorted by relative path and each carries its folder's label (recursive scan)
    rel = [p.relative_to(root).as_posix() for p in ds.files]
    assert rel == sorted(rel)
    for path, label in zip(ds.files, ds.labels, strict=True):
        assert ds.label_map[label] == path.relative_to(root).parts[0]
    x, y = ds[(0, 0)]
    assert x.shape == (3, 12, 10) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    # the pixel values map exactly: uint8 v -> v / 127.5 - 1
    ref = np.asarray(Image.open(ds.files[0]).convert("RGB"), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(x, torch.from_numpy(ref).permute(2, 0, 1))


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path, channels):
    # a 16-bit ramp: Pillow's convert("L") would clip everything above 255 to white
    ramp = (np.arange(64 * 64, dtype=np.int64) * 65535 // (64 * 64 - 1)).astype(np.uint16).reshape(64, 64)
    root = tmp_path / "grey16"
    root.mkdir()
    Image.fromarray(ramp).save(root / "ramp.png")
    assert Image.open(root / "ramp.png").mode.startswith("I")
    ds = open_images(DataConfig(path=str(root), channels=channels))
    x, _ = ds[(0, 0)]
    expected = torch.from_numpy(((ramp.astype(np.int64) + 128) // 257).astype(np.float32)) / 127.5 - 1
    assert x.shape == (channels, 64, 64)
    assert torch.equal(x[0], expected) and torch.equal(x[-1], expected)
    assert float((x == 1.0).float().mean()) < 0.01  # only the top of the ramp is white
    # the CLI's --image reads it the same way
    assert torch.equal(_load_image(str(root / "ramp.png"), 1, 0)[0, 0], expected)


def test_unlabelled_and_empty_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("L", (8, 8), 128).save(root / "a.png")
    Image.new("L", (8, 8), 0).save(root / "b.png")
    ds = open_images(DataConfig(path=str(root)))
    assert ds.label_map is None and list(ds.labels) == [-1, -1] and ds.channels == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable images.*1 file"):
        open_images(DataConfig(path=str(empty)))
    with pytest.raises(FileNotFoundError, match="neither in the current directory"):
        open_images(DataConfig(path="no/such/folder"))


def test_mixed_sizes_need_a_resolution(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    Image.new("RGB", (20, 10)).save(root / "a.png")
    Image.new("RGB", (10, 30)).save(root / "b.png")
    with pytest.raises(ValueError, match="different sizes; set data.resolution"):
        open_images(DataConfig(path=str(root)))
    ds = open_images(DataConfig(path=str(root), resolution=8))
    assert ds[(0, 0)][0].shape == (3, 8, 8) and ds[(1, 0)][0].shape == (3, 8, 8)
    stretch = open_images(DataConfig(path=str(root), resolution=6, resize="stretch", channels=1))
    assert stretch[(1, 0)][0].shape == (1, 6, 6)


def test_npz_arrays_and_flip_determinism(tmp_path, mnist):
    images, labels = mnist
    path = tmp_path / "m.npz"
    np.savez(path, images=images[:40], labels=labels[:40])
    ds = open_images(DataConfig(path=str(path), flip=True), seed=3)
    assert ds.channels == 1 and ds.size == (28, 28) and ds.label_map == [str(i) for i in range(int(labels[:40].max()) + 1)]
    x, y = ds.get_batch([0, 1, 2, 3, 4, 5, 6, 7], epoch=0)
    raw = torch.from_numpy(images[:8].astype(np.float32)) / 127.5 - 1
    flipped = [bool(torch.equal(x[i, 0], raw[i].flip(-1))) and not torch.equal(raw[i], raw[i].flip(-1)) for i in range(8)]
    same = [bool(torch.equal(x[i, 0], raw[i])) for i in range(8)]
    assert all(f or s for f, s in zip(flipped, same, strict=True)) and any(flipped) and any(same)
    again, _ = ds.get_batch([0, 1, 2, 3, 4, 5, 6, 7], epoch=0)
    assert torch.equal(x, again)  # a function of (seed, epoch, index) only
    # the per-item (PIL) path agrees with the vectorised one
    assert torch.equal(torch.stack([ds[(i, 0)][0] for i in range(8)]), x)
    assert torch.equal(y, torch.from_numpy(labels[:8]))
    with pytest.raises(ValueError, match="'images' must be uint8"):
        bad = tmp_path / "bad.npz"
        np.savez(bad, images=np.zeros((2, 4, 4), np.float32))
        open_images(DataConfig(path=str(bad)))


def test_split_is_seeded_sorted_and_keeps_groups_together():
    ids = np.repeat(np.arange(50), 2)  # flipped twins share an id
    a = make_split(ids, DataConfig(eval_fraction=0.1, split_seed=5))
    rev = ids[::-1].copy()
    b = make_split(rev, DataConfig(eval_fraction=0.1, split_seed=5))
    assert a.info["eval_items"] == 10 and a.info["train_items"] == 90
    assert set(ids[a.eval]) == set(rev[b.eval])  # independent of the listing order
    assert not set(ids[a.eval]) & set(ids[a.train])  # no twin on both sides
    c = make_split(ids, DataConfig(eval_fraction=0.1, split_seed=6))
    assert set(ids[c.eval]) != set(ids[a.eval])
    capped = make_split(ids, DataConfig(eval_fraction=0.5, eval_max=3))
    assert len(set(ids[capped.eval])) == 3
    none = make_split(ids, DataConfig(eval_fraction=0.0))
    assert len(none.eval) == 0 and len(none.train) == 100


def test_batch_order_resumes_exactly_and_partitions_ranks():
    items = np.arange(100, 137)
    full = BatchOrder(items, 5, seed=1)
    seq = [full.next() for _ in range(20)]  # crosses epochs (7 batches per epoch)
    assert [e for _, e in seq][:8] == [0] * 7 + [1]
    first = BatchOrder(items, 5, seed=1)
    for _ in range(9):
        first.next()
    state = first.state_dict()
    resumed = BatchOrder(items, 5, seed=1)
    resumed.load_state_dict(state)
    rest = [resumed.next() for _ in range(11)]
    for (a, ea), (b, eb) in zip(seq[9:], rest, strict=True):
        assert ea == eb and np.array_equal(a, b)
    # an epoch visits every item at most once; two ranks see disjoint items
    r0, r1 = BatchOrder(items, 4, rank=0, world_size=2, seed=1), BatchOrder(items, 4, rank=1, world_size=2, seed=1)
    e0 = np.concatenate([r0.next()[0] for _ in range(r0.batches_per_epoch())])
    e1 = np.concatenate([r1.next()[0] for _ in range(r1.batches_per_epoch())])
    assert len(set(e0)) == len(e0) and not set(e0) & set(e1) and set(e0) | set(e1) <= set(items)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchOrder(items[:3], 4)
