"""The emoji dataset: real colour artwork with 9 labelled categories, built from two npm packages.

``sundae-train data emoji --out data/emoji`` runs ``npm pack`` for the pinned packages below,
checks each tarball against its pinned npm integrity hash (sha512), reads the 64-px PNGs of every
emoji and of its skin-tone variants (``skin_variations`` in ``emoji.json``), composites RGBA over
white and writes two ``.npz`` files the trainer reads directly:

- ``emoji_train.npz`` / ``emoji_test.npz``: ``images`` uint8 ``[N, 64, 64, 3]``, ``labels``
  int64 (index into ``label_names``), ``label_names`` (the 9 categories, in ``CATEGORIES`` order),
  ``short_names`` (the emoji's short name, e.g. ``"santa"``, or ``"santa::skin-tone-2"`` for a
  skin-tone variant), ``bases`` (the base emoji's short name: a skin-tone variant shares its
  base's), ``styles`` (``"google"`` or ``"twitter"``), ``unified`` (code points). The
  ``"Component"`` category (bare skin-tone swatches, hair styles) is dropped.
- The held-out split is by *base emoji*: a base, all its skin-tone variants and both styles are
  on the same side. Per category, the sorted base ids are permuted with a fixed seed and the
  first ``round(fraction * n)`` are held out (10% by default; at least one and at most n - 1
  when n > 1), so every category with two or more bases is in both splits.
- ``manifest.json``: counts per split and category, the packages and their integrity hashes, and
  the sha256 of both files. The files are written byte-for-byte reproducibly (fixed zip
  timestamps), so the sha256 values in ``EXPECTED_SHA256`` are checked after a default build.

Offline builds: ``packages={"google": path, "twitter": path}`` (``--packages STYLE=PATH``) takes
the ``npm pack`` tarballs or unpacked package folders. A ``.tgz`` is checked against the pinned
integrity like a downloaded one; a *folder is not checked* (there is no tarball to hash), and a
build from a folder skips the ``EXPECTED_SHA256`` check too (the manifest records
``"checked": false`` for that package).

Licences (from the packages' README, "Image licenses"): the Google / Noto Emoji images are
Apache-2.0; the Twitter / Twemoji graphics are CC-BY 4.0 (attribution required, e.g. "Twemoji
graphics by Twitter, Inc. and other contributors, licensed under CC-BY 4.0"). The packages' own
code and metadata (emoji-datasource, Cal Henderson) are MIT.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..sundae_lib._helpers import current_umask

logger = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
DROPPED_CATEGORIES = ("Component",)
STYLES: tuple[str, ...] = ("google", "twitter")
IMAGE_SIZE = 64

# npm package, version and the registry's integrity string (sha512 of the tarball, base64)
PACKAGES: dict[str, tuple[str, str, str]] = {
    "google": (
        "emoji-datasource-google",
        "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    ),
    "twitter": (
        "emoji-datasource-twitter",
        "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    ),
}
LICENCES = {
    "google": "Noto Emoji images (Google): Apache License 2.0",
    "twitter": "Twemoji graphics (Twitter, Inc. and other contributors): CC-BY 4.0, attribution required",
}

_TONES = {"1F3FB": "skin-tone-2", "1F3FC": "skin-tone-3", "1F3FD": "skin-tone-4", "1F3FE": "skin-tone-5", "1F3FF": "skin-tone-6"}

HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 0
TRAIN_FILE = "emoji_train.npz"
TEST_FILE = "emoji_test.npz"
# sha256 of the files a default build writes (fraction 0.1, seed 0, both pinned packages checked
# as tarballs), from a real build with Pillow 13.0; checked after every such build
EXPECTED_SHA256: dict[str, str] = {
    TRAIN_FILE: "e68f7c976f42ab418d854fa53b4d2306ce0d1113576ad4d0256822af9038979b",  # 6,852 images
    TEST_FILE: "8598e562bba33bc40a1381c7ba571fa2fac7b4ab477aa8e1f61e9b243f655deb",  # 710 images
}


@dataclass(frozen=True)
class EmojiImage:
    unified: str  # code points of this image ("1F385-1F3FB")
    base: str  # the base emoji's short name (variants share it)
    short_name: str  # this image's short name ("santa" or "santa::skin-tone-2")
    category: str
    style: str
    png: bytes


# ----------------------------------------------------------------------------------------------
# fetching and checking the packages
# ----------------------------------------------------------------------------------------------


def integrity_of(path: Path) -> str:
    """npm's integrity string (``sha512-<base64>``) of a file."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode("ascii")


def check_integrity(path: Path, expected: str) -> None:
    got = integrity_of(path)
    if got != expected:
        raise ValueError(
            f"{str(path)!r} fails its integrity check: sha512 is {got}, the pinned package has "
            f"{expected}. Delete the file and build again (a partial download or a different "
            "package version)"
        )


def npm_pack(style: str, cache_dir: Path) -> Path:
    """``npm pack`` the pinned package of ``style`` into ``cache_dir`` (reused when present and
    intact) and return the checked tarball."""
    name, version, integrity = PACKAGES[style]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tgz = cache_dir / f"{name}-{version}.tgz"
    if tgz.is_file():
        try:
            check_integrity(tgz, integrity)
            return tgz
        except ValueError:
            logger.warning("cached %s fails its integrity check; fetching it again", tgz)
            tgz.unlink()
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            "building the emoji dataset needs 'npm' (Node.js) to fetch "
            f"{name}@{version}; install Node.js, or pass --packages with the two .tgz files "
            "or unpacked package folders"
        )
    logger.info("npm pack %s@%s -> %s", name, version, cache_dir)
    try:
        subprocess.run(
            [npm, "pack", f"{name}@{version}", "--pack-destination", str(cache_dir), "--silent"],
            check=True, capture_output=True, text=True, timeout=900,
        )
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"npm pack {name}@{version} failed: {(exc.stderr or exc.stdout).strip()[-500:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ValueError(f"npm pack {name}@{version} did not finish in 15 minutes; check the network") from exc
    if not tgz.is_file():
        raise ValueError(f"npm pack {name}@{version} wrote no {tgz.name} in {str(cache_dir)!r}")
    check_integrity(tgz, integrity)
    return tgz


class _PackageReader:
    """Reads files of an npm package given as a ``.tgz`` or as a folder (unpacked: ``package/``
    inside it, or the package root itself)."""

    def __init__(self, source: Path) -> None:
        self.source = Path(source)
        self._tar = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if self.source.is_file():
            self._tar = tarfile.open(self.source, "r:*")
            for m in self._tar.getmembers():
                if m.isfile():
                    name = m.name.split("/", 1)[1] if "/" in m.name else m.name  # drop "package/"
                    self._members[name] = m
            self.root = None
        elif self.source.is_dir():
            self.root = self.source / "package" if (self.source / "package" / "emoji.json").is_file() else self.source
            if not (self.root / "emoji.json").is_file():
                raise ValueError(f"{str(self.source)!r} has no emoji.json (nor package/emoji.json): not an emoji-datasource package")
        else:
            raise FileNotFoundError(f"emoji package {str(self.source)!r} does not exist")

    def read(self, name: str) -> bytes | None:
        if self._tar is not None:
            m = self._members.get(name)
            if m is None:
                return None
            f = self._tar.extractfile(m)
            return f.read() if f is not None else None
        p = self.root / name
        return p.read_bytes() if p.is_file() else None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def read_package(source: Path, style: str) -> list[EmojiImage]:
    """Every 64-px image of ``style`` in the package (bases and skin-tone variants), without the
    dropped categories, in ``emoji.json`` order."""
    if style not in STYLES:
        raise ValueError(f"emoji style {style!r} is not one of {list(STYLES)}")
    reader = _PackageReader(source)
    try:
        raw = reader.read("emoji.json")
        if raw is None:
            raise ValueError(f"{str(source)!r} has no emoji.json: not an emoji-datasource package")
        try:
            entries = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(source)!r}: emoji.json is not valid JSON ({exc})") from exc
        out: list[EmojiImage] = []
        missing = 0
        for e in entries:
            category = e.get("category")
            if category in DROPPED_CATEGORIES:
                continue
            if category not in CATEGORIES:
                raise ValueError(f"{str(source)!r}: emoji {e.get('short_name')!r} has unknown category {category!r}; expected one of {list(CATEGORIES)}")
            try:
                base = e["short_name"]
                variants = [(e, base)]
                for tone, v in sorted((e.get("skin_variations") or {}).items()):
                    variants.append((v, base + "".join(f"::{_TONES.get(t, t.lower())}" for t in tone.split("-"))))
                for item, short in variants:
                    if not item.get(f"has_img_{style}", False):
                        continue
                    png = reader.read(f"img/{style}/{IMAGE_SIZE}/{item['image']}")
                    if png is None:
                        missing += 1
                        continue
                    out.append(EmojiImage(item["unified"], base, short, category, style, png))
            except KeyError as exc:
                raise ValueError(f"{str(source)!r}: emoji.json entry {e.get('short_name')!r} lacks the key {exc}") from exc
        if missing:
            logger.warning("%s: %d images listed in emoji.json are not in the package", source, missing)
        return out
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# images and the split
# ----------------------------------------------------------------------------------------------


def composite_over_white(png: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PNG (any mode, alpha or not) composited over white -> uint8 ``[size, size, 3]``."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        rgba = img.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)


def held_out_bases(images: Iterable[EmojiImage], fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED) -> set[str]:
    """The base short names held out: per category, ``round(fraction * n)`` of its ``n`` sorted
    bases (Python's round, half to even; at least one and at most ``n - 1`` when ``n > 1``, none
    when ``n == 1``), picked by a permutation seeded with ``(seed, category index)``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction {fraction!r} must be in (0, 1), e.g. 0.1")
    per_cat: dict[str, set[str]] = {}
    for im in images:
        per_cat.setdefault(im.category, set()).add(im.base)
    held: set[str] = set()
    for i, cat in enumerate(CATEGORIES):
        bases = sorted(per_cat.get(cat, ()))
        if not bases:
            continue
        rng = np.random.default_rng([seed, i])
        k = min(len(bases) - 1, max(1, round(fraction * len(bases))))  # both sides keep the category
        held.update(bases[j] for j in rng.permutation(len(bases))[:k])
    return held


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def write_npz_reproducible(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """``np.savez_compressed`` with fixed zip timestamps (identical bytes for identical arrays),
    written atomically; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key in arrays:
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
                zf.writestr(info, buf.getvalue(), compresslevel=6)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _arrays(items: list[tuple[EmojiImage, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        "images": np.stack([a for _, a in items]) if items else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        "labels": np.array([CATEGORIES.index(e.category) for e, _ in items], dtype=np.int64),
        "label_names": np.array(CATEGORIES),
        "short_names": np.array([e.short_name for e, _ in items]),
        "bases": np.array([e.base for e, _ in items]),
        "styles": np.array([e.style for e, _ in items]),
        "unified": np.array([e.unified for e, _ in items]),
    }


def iter_images(packages: dict[str, Path]) -> Iterator[EmojiImage]:
    for style in STYLES:
        if style in packages:
            yield from read_package(packages[style], style)


def build_emoji(
    out_dir: str | os.PathLike,
    *,
    packages: dict[str, Path] | None = None,
    cache_dir: str | os.PathLike | None = None,
    fraction: float = HELD_OUT_FRACTION,
    seed: int = SPLIT_SEED,
    check_sha256: bool = True,
) -> dict:
    """Build ``emoji_train.npz``, ``emoji_test.npz`` and ``manifest.json`` in ``out_dir``.

    ``packages`` maps a style to a local ``.tgz`` or unpacked folder (no network). A tarball is
    checked against the pinned integrity; a folder cannot be, and a build that reads one skips
    the ``EXPECTED_SHA256`` check. Missing styles are fetched with ``npm pack`` into
    ``cache_dir`` (default ``out_dir/npm``). ``check_sha256=False`` skips the pinned-sha256
    check of a default build. Returns the manifest (also written to ``out_dir/manifest.json``)."""
    import PIL

    out = Path(out_dir)
    packages = {s: Path(p) for s, p in (packages or {}).items()}
    unknown = sorted(set(packages) - set(STYLES))
    if unknown:
        raise ValueError(f"unknown emoji style(s) {unknown}; use {list(STYLES)}")
    held_out_bases((), fraction, seed)  # a bad fraction fails here, before any download
    checked: dict[str, bool] = {}
    for style, path in packages.items():  # local inputs first: fail before any download
        if path.is_file():
            check_integrity(path, PACKAGES[style][2])
            checked[style] = True
        elif path.is_dir():
            _PackageReader(path).close()  # raises unless it holds emoji.json
            checked[style] = False
            logger.info("%s package is a folder (%s): not integrity-checked", style, path)
        else:
            raise FileNotFoundError(f"emoji package for {style!r}: {str(path)!r} does not exist")
    cache = Path(cache_dir) if cache_dir else out / "npm"
    for style in STYLES:
        if style not in packages:
            packages[style] = npm_pack(style, cache)
            checked[style] = True
    images = list(iter_images(packages))
    if not images:
        raise ValueError("the emoji packages hold no images of the 9 categories")
    held = held_out_bases(images, fraction, seed)
    train, test = [], []
    for im in images:
        (test if im.base in held else train).append((im, composite_over_white(im.png)))
    manifest = {
        "packages": {
            s: {"name": PACKAGES[s][0], "version": PACKAGES[s][1], "integrity": PACKAGES[s][2],
                "checked": checked[s], "licence": LICENCES[s]}
            for s in STYLES
        },
        "pillow": PIL.__version__,
        "categories": list(CATEGORIES),
        "held_out": {"by": "base emoji", "fraction": fraction, "seed": seed, "bases": len(held)},
        "files": {},
    }
    for name, items in ((TRAIN_FILE, train), (TEST_FILE, test)):
        digest = write_npz_reproducible(out / name, _arrays(items))
        counts = {c: 0 for c in CATEGORIES}
        for e, _ in items:
            counts[e.category] += 1
        manifest["files"][name] = {"sha256": digest, "images": len(items), "per_category": counts}
        logger.info("%s: %d images, sha256 %s", out / name, len(items), digest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # the pinned sha256 describe the default split of the two checked tarballs only
    default = fraction == HELD_OUT_FRACTION and seed == SPLIT_SEED and all(checked.values())
    if check_sha256 and default and EXPECTED_SHA256:
        for name, expected in EXPECTED_SHA256.items():
            got = manifest["files"][name]["sha256"]
            if got != expected:
                raise ValueError(
                    f"{str(out / name)!r} has sha256 {got}, the pinned build has {expected}: the "
                    f"images differ (Pillow {PIL.__version__} decodes or resizes differently?). The "
                    "files and manifest.json are written; train on them with care, or build with "
                    "--no-check to skip this check"
                )
    return manifest
