"""Latent (token) datasets: ``sundae-train latents`` writes them, ``sundae-train prior`` reads them.

Layout of a latent dataset folder::

    manifest.json          what was encoded and how (see below); "complete": true when done
    shard-00000.npz        tokens uint16 [n, h, w] (int32 when the codebook > 65536),
    shard-00001.npz        labels int64 [n] (-1 = unlabelled), ids int64 [n] (source image
    ...                    index), flipped bool [n]

The manifest records the VQ-GAN (source, file name, sha256, config, codebook size, factor), the
token grid, the label map, the image list fingerprint, the shard plan and skipped images.
With ``flip`` each image is stored twice, original then mirrored, in adjacent rows with the same
id, so splits by id keep twins together. Shards cover fixed ranges of source images and are
written atomically: a rerun with the same settings skips finished shards (resumable).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig, LatentsConfig, config_to_dict
from .data import ImageDataset, open_images

logger = logging.getLogger(__name__)

FORMAT = "sundae-latents/1"
MANIFEST = "manifest.json"


def _atomic_write(path: Path, data: bytes) -> None:
    from ..sundae_lib._helpers import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def source_fingerprint(source: str) -> tuple[str, str]:
    """``(sha256, file name)`` of a model source: a file, a folder (hash over its files) or an
    ``hf://`` file (hashed from the local Hugging Face cache)."""
    from ..sundae_lib._helpers import (
        file_sha256,
        hf_download,
        is_hf_source,
        parse_hf_source,
        source_sha256,
    )

    if is_hf_source(source):
        repo, name = parse_hf_source(source)
        if name and Path(name).suffix:
            path = hf_download(repo, name, source=source)
            return file_sha256(path), Path(name).name
        return hashlib.sha256(source.encode()).hexdigest(), source
    path = Path(source).expanduser()
    if path.is_file() or path.is_dir():
        return source_sha256(path), path.name
    raise FileNotFoundError(f"VQ-GAN source {source!r} does not exist")


def _dataset_fingerprint(ds: ImageDataset) -> str:
    h = hashlib.sha256(str(len(ds)).encode())
    files = getattr(ds, "files", None)
    if files is not None:
        for p in files:
            h.update(str(p).encode() + b"\0")
    else:
        h.update(ds.source.encode())
        h.update(str(ds.images.shape).encode())
    return h.hexdigest()


class _SafeItems(torch.utils.data.Dataset):
    """Items as ``(image, label, ok)``; an unreadable image gives ``ok = False`` (and zeros)."""

    def __init__(self, ds: ImageDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            return self.ds._transform(self.ds._load(i), i, 0), int(self.ds.labels[i]), True
        except (OSError, SyntaxError, ValueError) as exc:
            logger.warning("skipping unreadable %s (%s)", self.ds.describe(i), exc)
            h, w = self.ds.size
            return torch.zeros(self.ds.channels, h, w), int(self.ds.labels[i]), False


def encode_latents(cfg: LatentsConfig, *, argv: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Encode ``cfg.data`` with the VQ-GAN ``cfg.vqgan`` into ``cfg.out_dir``. Returns the
    manifest. Resumable: finished shards of an identical earlier run are kept."""
    from tqdm import tqdm

    from .. import __version__
    from ..sundae_lib import load_vqgan
    from .dist import pick_device
    from .runtime import autocast, resolve_precision

    if not cfg.vqgan:
        raise ValueError("latents: no VQ-GAN given; pass --vqgan PATH (or --set vqgan=...)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("latents runs as one process (shards are written by a single writer); run it without torchrun")
    from ..sundae_lib._helpers import is_hf_source
    from .config import resolve_input_path

    vq_source = cfg.vqgan if is_hf_source(cfg.vqgan) else str(resolve_input_path(cfg.vqgan, what="latents.vqgan"))
    data_cfg = dataclasses.replace(cfg.data, flip=False)  # flips are stored as twins instead
    ds = open_images(data_cfg)
    out = Path(cfg.out_dir)
    device = pick_device(cfg.device)
    dtype, _ = resolve_precision("fp32" if cfg.precision == "auto" else cfg.precision, device)
    vqgan = load_vqgan(vq_source).to(device).eval()
    if vqgan.in_channels != ds.channels:
        raise ValueError(
            f"the VQ-GAN takes {vqgan.in_channels}-channel images but the data has {ds.channels}; "
            f"set data.channels = {vqgan.in_channels}"
        )
    sha, name = source_fingerprint(vq_source)
    grid = vqgan.token_grid(*ds.size)
    k = int(vqgan.codebook_size)
    np_dtype = np.uint16 if k <= 65536 else np.int32
    per_shard = cfg.shard_size
    n_shards = -(-len(ds) // per_shard)
    plan = {
        "format": FORMAT,
        "vqgan": {
            "source": vq_source,
            "file": name,
            "sha256": sha,
            "config": dataclasses.asdict(vqgan.config),
            "codebook_size": k,
            "downsample_factor": int(vqgan.downsample_factor),
        },
        "dataset_fingerprint": _dataset_fingerprint(ds),
        "data": config_to_dict(data_cfg),
        "image_size": list(ds.size),
        "channels": ds.channels,
        "grid": list(grid),
        "dtype": np.dtype(np_dtype).name,
        "flip_twins": bool(cfg.data.flip),
        "images": len(ds),
        "images_per_shard": per_shard,
        "shards": [f"shard-{i:05d}.npz" for i in range(n_shards)],
        "label_map": ds.label_map,
        "source": ds.source,
    }
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        keys = ("format", "vqgan", "dataset_fingerprint", "data", "grid", "dtype", "flip_twins", "images_per_shard")
        diff = [key for key in keys if old.get(key) != json.loads(json.dumps(plan[key]))]
        if diff:
            raise ValueError(
                f"{str(out)!r} already holds latents made with different settings ({', '.join(diff)} "
                "differ); choose another --out folder or delete it"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(manifest_path, {**plan, "complete": False, "version": __version__, "argv": argv or []})

    safe = _SafeItems(ds)
    skipped_total = 0
    counts = []
    bar = tqdm(total=len(ds), desc="encode", unit="img", disable=not progress, dynamic_ncols=True)
    for s in range(n_shards):
        shard_path = out / plan["shards"][s]
        lo, hi = s * per_shard, min(len(ds), (s + 1) * per_shard)
        if shard_path.is_file():
            try:
                with np.load(shard_path) as old_shard:
                    done = int(old_shard["count"]), int(old_shard["skipped"])
                counts.append(done[0])
                skipped_total += done[1]
                bar.update(hi - lo)
                continue
            except Exception:
                logger.warning("re-encoding unreadable shard %s", shard_path)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(safe, range(lo, hi)), batch_size=cfg.batch_size,
            num_workers=cfg.num_workers, shuffle=False,
        )
        toks, labs, ids, flips = [], [], [], []
        skipped = 0
        offset = lo
        for x, y, ok in loader:
            idx = torch.arange(offset, offset + len(x))
            offset += len(x)
            keep = ok.bool()
            skipped += int((~keep).sum())
            if not keep.any():
                bar.update(len(x))
                continue
            x, y, idx = x[keep].to(device), y[keep], idx[keep]
            with torch.no_grad(), autocast(device, dtype):
                t = vqgan.encode(x)
                if cfg.data.flip:
                    tf = vqgan.encode(torch.flip(x, dims=[3]))
                    t = torch.stack([t, tf], dim=1).flatten(0, 1)  # twins adjacent
            reps = 2 if cfg.data.flip else 1
            toks.append(t.cpu().numpy().astype(np_dtype))
            labs.append(np.repeat(y.numpy().astype(np.int64), reps))
            ids.append(np.repeat(idx.numpy().astype(np.int64), reps))
            flips.append(np.tile(np.array([False, True][:reps]), len(idx)))
            bar.update(len(keep))
        h, w = grid
        arrays = {
            "tokens": np.concatenate(toks) if toks else np.zeros((0, h, w), np_dtype),
            "labels": np.concatenate(labs) if labs else np.zeros(0, np.int64),
            "ids": np.concatenate(ids) if ids else np.zeros(0, np.int64),
            "flipped": np.concatenate(flips) if flips else np.zeros(0, bool),
            "count": np.array(sum(len(a) for a in toks)),
            "skipped": np.array(skipped),
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        _atomic_write(shard_path, buf.getvalue())
        counts.append(int(arrays["count"]))
        skipped_total += skipped
    bar.close()
    if sum(counts) == 0:
        raise ValueError(f"latents: none of the {len(ds)} images of {ds.source} could be read")
    manifest = {
        **plan,
        "complete": True,
        "entries": int(sum(counts)),
        "shard_counts": counts,
        "skipped_images": int(skipped_total) + len(getattr(ds, "skipped", [])),
        "version": __version__,
        "argv": argv or [],
    }
    write_json(manifest_path, manifest)
    logger.info(
        "latents: %d images -> %d token grids %dx%d (%s) in %s; %d skipped",
        len(ds), manifest["entries"], grid[0], grid[1], manifest["dtype"], out, manifest["skipped_images"],
    )
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {MANIFEST}: not a latent dataset from 'sundae-train latents'")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(mpath)!r}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not manifest.get("complete"):
        raise ValueError(
            f"the latent dataset {str(path)!r} is incomplete (encoding was interrupted); rerun the "
            "same 'sundae-train latents' command to finish it (finished shards are kept)"
        )
    return manifest


class LatentTokens:
    """A latent dataset in memory: ``get_batch(indices, epoch) -> (tokens int64 [b, h, w],
    labels int64 [b])``. With ``cfg.flip`` both stored twins are items; otherwise only the
    originals. ``group_ids()`` gives the source image id of each item (twins share it)."""

    def __init__(self, path: Path, cfg: DataConfig) -> None:
        self.path = path
        self.manifest = read_manifest(path)
        parts: dict[str, list[np.ndarray]] = {"tokens": [], "labels": [], "ids": [], "flipped": []}
        for name in self.manifest["shards"]:
            with np.load(path / name) as shard:
                for key in parts:
                    parts[key].append(shard[key])
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        keep = np.ones(len(arrays["ids"]), dtype=bool)
        if not cfg.flip:
            keep &= ~arrays["flipped"]
        if cfg.limit:
            allowed = np.unique(arrays["ids"])[: cfg.limit]
            keep &= np.isin(arrays["ids"], allowed)
        self.tokens = arrays["tokens"][keep]
        self.ids = arrays["ids"][keep]
        labels = arrays["labels"][keep]
        self.label_map = self.manifest.get("label_map") if cfg.labels else None
        self.labels = labels if self.label_map else np.full(len(labels), -1, dtype=np.int64)
        if len(self.tokens) == 0:
            raise ValueError(f"the latent dataset {str(path)!r} holds no token grids")
        self.grid = tuple(self.manifest["grid"])
        self.codebook_size = int(self.manifest["vqgan"]["codebook_size"])
        self.source = str(path)
        logger.info(
            "%s: %d token grids %dx%d (codebook %d)%s", path, len(self.tokens), *self.grid,
            self.codebook_size, f", {len(self.label_map)} classes" if self.label_map else "",
        )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_classes(self) -> int:
        return len(self.label_map) if self.label_map else 0

    def group_ids(self) -> np.ndarray:
        return self.ids

    def get_batch(self, indices, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        tokens = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return tokens, torch.from_numpy(self.labels[idx].copy())
