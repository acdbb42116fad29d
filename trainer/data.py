"""Image datasets for training: image folders and ``.npz`` arrays, with deterministic splits.

- Folders are scanned recursively and sorted; a class label comes from the first-level subfolder
  (when every image sits in one of >= 2 subfolders). Class names that are all integers sort
  numerically ("2" before "10", unlike ImageFolder: bug B11 of the official code in
  docs/official-code.md), and the label -> name list is kept as ``label_map``.
- ``.npz`` files hold ``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]`` and optionally
  ``labels`` (ints >= 0) and ``label_names``.
- Items come out as float ``[c, H, W]`` in [-1, 1] with an int64 label (-1 = none).
- Augmentation randomness (random crop, flip) is a function of (seed, epoch, index), so a
  resumed run and any number of DataLoader workers see exactly the same images.
- Splits hold out whole *groups* (an image and its flipped twin share a group id), chosen by a
  seeded permutation of the sorted ids: independent of filesystem order (bug B10).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig, resolve_input_path

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def sort_class_names(names: Sequence[str]) -> list[str]:
    """Numeric names sort by value ("2" < "10"), anything else as strings."""
    names = list(names)
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index & 0xFFFFFFFF])


# integer grey modes Pillow's convert("L") clips at 255 instead of scaling (16-bit PNGs open as
# "I;16"; older Pillows and 32-bit TIFFs give "I", read here as 16-bit values too)
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_8bit(img):
    """A PIL image with 8-bit channels: 16-bit grey (``I;16`` / ``I``) is scaled by 255/65535
    (rounded) to mode ``L``; every other mode is returned as is for ``convert`` to handle."""
    from PIL import Image

    if img.mode not in _WIDE_GREY_MODES:
        return img
    arr = np.asarray(img).astype(np.int64)
    return Image.fromarray(((np.clip(arr, 0, 65535) + 128) // 257).astype(np.uint8))  # mode L


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] or [H, W, C] -> float [C, H, W] in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


class ImageDataset(torch.utils.data.Dataset):
    """Base: ``dataset[(index, epoch)] -> (image [c, H, W] float in [-1, 1], label int64)``.

    Subclasses provide ``_load(index) -> PIL.Image | np.ndarray`` and ``__len__``.
    ``labels`` is an int64 array (``-1`` everywhere when unlabelled), ``label_map`` the class
    names (``None`` when unlabelled), ``size`` the output ``(H, W)``, ``channels`` 1 or 3."""

    labels: np.ndarray
    label_map: list[str] | None
    source: str

    def __init__(self, cfg: DataConfig, *, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.size: tuple[int, int] = (0, 0)
        self.channels = 3

    # ---- subclass interface ----
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"item {index}"

    # ---- transforms ----
    def _transform(self, img, index: int, epoch: int) -> torch.Tensor:
        from PIL import Image

        cfg = self.cfg
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img)
        img = to_8bit(img).convert("L" if self.channels == 1 else "RGB")
        rng = _item_rng(self.seed, epoch, index) if (cfg.flip or cfg.crop == "random") else None
        res = cfg.resolution
        if res:
            w, h = img.size
            if cfg.resize == "stretch":
                img = img.resize((res, res), Image.Resampling.BICUBIC)
            elif cfg.resize == "shorter":
                scale = res / min(w, h)
                nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
                if (nw, nh) != (w, h):
                    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
            w, h = img.size
            if (w, h) != (res, res):
                if w < res or h < res:
                    raise ValueError(
                        f"{self.describe(index)} is {w}x{h}, smaller than data.resolution={res} "
                        "with data.resize='none'; use resize='shorter' or 'stretch'"
                    )
                if cfg.crop == "random":
                    left, top = int(rng.integers(0, w - res + 1)), int(rng.integers(0, h - res + 1))
                else:
                    left, top = (w - res) // 2, (h - res) // 2
                img = img.crop((left, top, left + res, top + res))
        arr = np.asarray(img)
        if cfg.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return _to_tensor(arr)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        n = len(self)
        for attempt in range(10):
            i = (index + attempt) % n
            try:
                img = self._transform(self._load(i), i, epoch)
            except (OSError, SyntaxError) as exc:  # PIL's decode errors
                logger.warning("skipping unreadable %s (%s); using the next image", self.describe(i), exc)
                continue
            return img, int(self.labels[i])
        raise OSError(f"10 consecutive unreadable images from {self.describe(index)} on; check the dataset")

    def get_batch(self, indices: Sequence[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[(int(i), epoch)] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.label_map) if self.label_map else 0

    def group_ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    def _output_size(self, native: tuple[int, int] | None) -> tuple[int, int]:
        if self.cfg.resolution:
            return (self.cfg.resolution, self.cfg.resolution)
        if native is None:
            raise ValueError(
                f"{self.source}: images have different sizes; set data.resolution (e.g. "
                "--set data.resolution=256) to resize and crop them to one square size"
            )
        return native


class FolderImages(ImageDataset):
    """Every image under ``root`` (recursive, sorted by relative path)."""

    def __init__(self, root: Path, cfg: DataConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        from PIL import Image

        self.source = str(root)
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if cfg.limit:
            files = files[: cfg.limit]
        skipped: list[str] = []
        sizes: set[tuple[int, int]] = set()
        modes: set[str] = set()
        if cfg.verify:
            good = []
            for p in files:
                try:
                    with Image.open(p) as im:
                        sizes.add((im.size[1], im.size[0]))
                        modes.add(im.mode)
                    good.append(p)
                except Exception as exc:  # PIL raises many types for broken files
                    skipped.append(f"{p.relative_to(root).as_posix()} ({type(exc).__name__})")
            files = good
        self.skipped = skipped
        if skipped:
            logger.warning(
                "%s: skipped %d unreadable file(s): %s%s", root, len(skipped), ", ".join(skipped[:5]),
                " ..." if len(skipped) > 5 else "",
            )
        if not files:
            raise ValueError(
                f"no readable images found under {str(root)!r} (extensions {', '.join(IMAGE_EXTS)})"
                + (f"; {len(skipped)} file(s) could not be read" if skipped else "")
            )
        self.files = files
        rel = [p.relative_to(root).parts for p in files]
        classes = sorted({r[0] for r in rel if len(r) > 1})
        labelled = cfg.labels and len(classes) >= 2 and all(len(r) > 1 for r in rel)
        if labelled:
            self.label_map = sort_class_names(classes)
            index = {name: i for i, name in enumerate(self.label_map)}
            self.labels = np.array([index[r[0]] for r in rel], dtype=np.int64)
        else:
            self.label_map = None
            self.labels = np.full(len(files), -1, dtype=np.int64)
        if cfg.channels:
            self.channels = cfg.channels
        else:
            self.channels = 1 if modes and modes <= {"L", "1", "I;16", "I"} else 3
        native = next(iter(sizes)) if len(sizes) == 1 else None
        if not cfg.verify and not cfg.resolution:
            with Image.open(files[0]) as im:
                native = (im.size[1], im.size[0])
        self.size = self._output_size(native)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return f"image {str(self.files[index])!r}"

    def _load(self, index: int):
        from PIL import Image

        with Image.open(self.files[index]) as im:
            im.load()
            return im.copy()


class ArrayImages(ImageDataset):
    """Images from an ``.npz`` file (``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]``)."""

    def __init__(self, path: Path, cfg: DataConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.source = str(path)
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise ValueError(f"{str(path)!r} has no 'images' array (keys: {sorted(data.files)})")
            images = data["images"]
            labels = data["labels"] if "labels" in data else None
            names = [str(n) for n in data["label_names"]] if "label_names" in data else None
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise ValueError(
                f"{str(path)!r}: 'images' must be uint8 [N, H, W] or [N, H, W, C] with C in 1/3/4, "
                f"got {images.dtype} {list(images.shape)}"
            )
        if cfg.limit:
            images = images[: cfg.limit]
            labels = labels[: cfg.limit] if labels is not None else None
        if len(images) == 0:
            raise ValueError(f"{str(path)!r} holds no images")
        if images.ndim == 4 and images.shape[3] == 4:
            images = images[..., :3]
        self.images = images
        stored_c = 1 if images.ndim == 3 or images.shape[3] == 1 else 3
        self.channels = cfg.channels or stored_c
        if labels is not None and cfg.labels:
            labels = np.asarray(labels).astype(np.int64).reshape(-1)
            if labels.shape[0] != images.shape[0] or labels.min() < 0:
                raise ValueError(
                    f"{str(path)!r}: 'labels' must be {images.shape[0]} integers >= 0, got shape "
                    f"{list(labels.shape)} min {labels.min()}"
                )
            k = int(labels.max()) + 1
            if names is not None and len(names) < k:
                raise ValueError(f"{str(path)!r}: {len(names)} label_names for labels up to {k - 1}")
            self.label_map = names[: max(k, len(names))] if names is not None else [str(i) for i in range(k)]
            self.labels = labels
        else:
            self.label_map = None
            self.labels = np.full(len(images), -1, dtype=np.int64)
        self.size = self._output_size(tuple(images.shape[1:3]))
        # fast path: nothing to resize or convert
        self._direct = (not cfg.resolution or self.size == tuple(images.shape[1:3])) and self.channels == stored_c
        self.skipped = []

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int):
        return self.images[index]

    def get_batch(self, indices: Sequence[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._direct:
            return super().get_batch(indices, epoch)
        idx = np.asarray(indices, dtype=np.int64)
        arr = self.images[idx]
        if arr.ndim == 3:
            arr = arr[..., None]
        if self.cfg.flip:
            flips = np.array([_item_rng(self.seed, epoch, int(i)).random() < 0.5 for i in idx])
            arr = np.where(flips[:, None, None, None], arr[:, :, ::-1], arr)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, torch.from_numpy(self.labels[idx].copy())


def detect_kind(path: Path) -> str:
    if path.is_dir():
        return "latents" if (path / "manifest.json").is_file() else "folder"
    if path.suffix == ".npz":
        return "npz"
    raise ValueError(
        f"data.path {str(path)!r}: not a folder or an .npz file; give an image folder, an .npz with "
        "an 'images' array, or a latent dataset folder from 'sundae-train latents'"
    )


def open_images(cfg: DataConfig, *, seed: int = 0) -> ImageDataset:
    """Open the image dataset ``cfg`` describes (folder or ``.npz``)."""
    path = resolve_input_path(cfg.path, what="data.path")
    kind = detect_kind(path) if cfg.kind == "auto" else cfg.kind
    if kind == "folder":
        if not path.is_dir():
            raise ValueError(f"data.kind='folder' but {str(path)!r} is not a folder")
        ds: ImageDataset = FolderImages(path, cfg, seed=seed)
    elif kind == "npz":
        ds = ArrayImages(path, cfg, seed=seed)
    else:
        raise ValueError(
            f"data.path {str(path)!r} is a latent (token) dataset; this command needs images "
            "(an image folder or an .npz file)"
        )
    logger.info(
        "%s: %d images, %s, %dx%d, %d channel(s)%s", ds.source, len(ds), kind, ds.size[0], ds.size[1],
        ds.channels, f", {ds.num_classes} classes" if ds.num_classes else ", unlabelled",
    )
    return ds


# ----------------------------------------------------------------------------------------------
# splits and batch order
# ----------------------------------------------------------------------------------------------


@dataclass
class Split:
    train: np.ndarray  # item indices
    eval: np.ndarray
    info: dict[str, Any]


def make_split(group_ids: np.ndarray, cfg: DataConfig) -> Split:
    """Hold out ``eval_fraction`` of the groups (at most ``eval_max``), chosen by a permutation
    seeded with ``split_seed`` over the *sorted* unique ids. Items of one group stay together."""
    groups = np.unique(group_ids)
    n_eval = 0
    if cfg.eval_fraction > 0 and len(groups) > 1:
        n_eval = int(min(cfg.eval_max, max(1, round(cfg.eval_fraction * len(groups)))))
        n_eval = min(n_eval, len(groups) - 1)
    gen = torch.Generator().manual_seed(int(cfg.split_seed))
    perm = torch.randperm(len(groups), generator=gen).numpy()
    eval_groups = np.sort(groups[perm[:n_eval]])
    is_eval = np.isin(group_ids, eval_groups)
    train = np.flatnonzero(~is_eval)
    held = np.flatnonzero(is_eval)
    digest = hashlib.sha256(np.ascontiguousarray(eval_groups, dtype=np.int64).tobytes()).hexdigest()
    info = {
        "split_seed": int(cfg.split_seed),
        "eval_fraction": cfg.eval_fraction,
        "groups": len(groups),
        "train_items": int(len(train)),
        "eval_items": int(len(held)),
        "eval_groups_sha256": digest,
        "eval_groups": eval_groups.tolist() if len(eval_groups) <= 20000 else None,
    }
    return Split(train=train, eval=held, info=info)


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class BatchOrder:
    """Per-rank batches of positions into ``items``, epoch by epoch, through a
    ``DistributedSampler`` (shuffle seeded by ``seed + epoch``, tail dropped so that every rank
    gets the same number of full batches). ``position = (epoch, batch)`` is the next batch; it
    is saved in checkpoints and restored exactly on resume."""

    def __init__(self, items: np.ndarray, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.items = np.asarray(items, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.epoch, self.batch = 0, 0
        per_rank = len(self.items) // world_size
        if per_rank < self.batch_size:
            raise ValueError(
                f"the training split has {len(self.items)} items: fewer than one batch of "
                f"{self.batch_size} per rank on {world_size} rank(s); lower optim.batch_size or add data"
            )
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def batches_per_epoch(self) -> int:
        return (len(self.items) // self.world_size) // self.batch_size

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            sampler = torch.utils.data.DistributedSampler(
                _Sized(len(self.items)), num_replicas=self.world_size, rank=self.rank,
                shuffle=True, seed=self.seed, drop_last=True,
            )
            sampler.set_epoch(epoch)
            order = self.items[np.fromiter(iter(sampler), dtype=np.int64)]
            nb = len(order) // self.batch_size
            self._cache = (epoch, [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(nb)])
        return self._cache[1]

    def next(self) -> tuple[np.ndarray, int]:
        """The next batch of item indices and its epoch; advances the position."""
        batches = self._epoch_batches(self.epoch)
        if self.batch >= len(batches):
            self.epoch, self.batch = self.epoch + 1, 0
            batches = self._epoch_batches(self.epoch)
        out = (batches[self.batch], self.epoch)
        self.batch += 1
        return out

    def upcoming(self, count: int) -> list[tuple[np.ndarray, int]]:
        """The next ``count`` batches without advancing (for DataLoader prefetch)."""
        saved = (self.epoch, self.batch)
        out = [self.next() for _ in range(count)]
        self.epoch, self.batch = saved
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("world_size", self.world_size)) != self.world_size:
            logger.warning(
                "resuming on %d rank(s) a run saved on %d: the data order restarts at the saved epoch",
                self.world_size, state["world_size"],
            )
            self.epoch, self.batch = int(state["epoch"]), 0
            return
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class BatchLoader:
    """Turns a :class:`BatchOrder` into ``(x, labels)`` batches from a dataset with
    ``get_batch(indices, epoch)``. In-memory datasets are indexed directly; image folders go
    through a DataLoader with ``num_workers`` processes reading ahead. Since batches are planned
    by ``order`` (not by the loader), the position stays exact across resumes."""

    def __init__(self, dataset, order: BatchOrder, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.order = dataset, order
        self.num_workers = num_workers if isinstance(dataset, FolderImages) else 0
        self.pin_memory = pin_memory
        self._iter = None
        self._pending: list[tuple[np.ndarray, int]] = []

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers == 0:
            idx, epoch = self.order.next()
            return self.dataset.get_batch(idx, epoch)
        if self._iter is None or not self._pending:
            # plan the rest of this epoch, then stream it through worker processes
            plan = self.order.upcoming(self.order.batches_per_epoch() - self.order.batch or self.order.batches_per_epoch())
            self._pending = plan
            keys = [[(int(i), e) for i in idx] for idx, e in plan]
            self._iter = iter(
                torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=keys, num_workers=self.num_workers,
                    pin_memory=self.pin_memory, persistent_workers=False,
                )
            )
        self._pending.pop(0)
        self.order.next()
        x, y = next(self._iter)
        return x, y.long()

    def __iter__(self):
        return self
