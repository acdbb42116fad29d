"""Rebuild ``data/emoji_subset.npz``: 36 real emoji (4 per category) for tests and smoke runs.

    sundae-train data emoji --out data/emoji        # the full dataset first
    python data/make_emoji_subset.py                # -> data/emoji_subset.npz

Selection (deterministic, training split only, so nothing held out leaks into the subset): per
category, in ``label_names`` order, the base emoji (``short_names == bases``, no skin-tone
variant) that have both a google and a twitter image, in file order; of those, the ones at
positions ``n // 3`` and ``2 * n // 3``; each contributes its google then its twitter image
(2 google + 2 twitter per category, the same two emoji in both styles). The file has the same
keys as ``emoji_train.npz`` and is written with ``write_npz_reproducible``, so the same input
gives the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from comfyui_sundae.trainer.emoji import TRAIN_FILE, sha256_of, write_npz_reproducible

HERE = Path(__file__).resolve().parent
PER_STYLE = 2


def select(data: dict[str, np.ndarray]) -> np.ndarray:
    """Indices into the train file, category by category (see the module docstring)."""
    picked: list[int] = []
    short, bases, styles, labels = data["short_names"], data["bases"], data["styles"], data["labels"]
    for k, name in enumerate(data["label_names"]):
        where: dict[str, dict[str, int]] = {}  # base -> style -> index, in file order
        for i in np.flatnonzero((labels == k) & (short == bases)):
            where.setdefault(str(bases[i]), {})[str(styles[i])] = int(i)
        both = [b for b, s in where.items() if {"google", "twitter"} <= set(s)]
        if len(both) < PER_STYLE:
            raise ValueError(f"category {name!r} has {len(both)} base emoji in both styles; need {PER_STYLE}")
        for j in range(1, PER_STYLE + 1):
            base = both[j * len(both) // (PER_STYLE + 1)]
            picked += [where[base]["google"], where[base]["twitter"]]
    return np.array(picked, dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=HERE / "emoji", help="folder with emoji_train.npz")
    ap.add_argument("--out", type=Path, default=HERE / "emoji_subset.npz")
    args = ap.parse_args()
    with np.load(args.src / TRAIN_FILE, allow_pickle=False) as f:
        data = {key: f[key] for key in f.files}
    idx = select(data)
    subset = {key: (value if key == "label_names" else value[idx]) for key, value in data.items()}
    digest = write_npz_reproducible(args.out, subset)
    print(f"{args.out}: {len(idx)} images, {args.out.stat().st_size / 1024:.0f} KB, sha256 {digest}")
    print("from", args.src / TRAIN_FILE, "sha256", sha256_of(args.src / TRAIN_FILE))
    for k, name in enumerate(subset["label_names"]):
        print(f"  {name}: {', '.join(f'{s} ({t})' for s, t in zip(subset['short_names'][subset['labels'] == k], subset['styles'][subset['labels'] == k]))}")


if __name__ == "__main__":
    main()
