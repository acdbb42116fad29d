"""README images from the shipped MNIST models, produced by the project's own CLI (`sundae-train`).

    python benchmarks/make_docs_images.py                 # docs/samples.png, inpainting.png, steps.png
    python benchmarks/make_docs_images.py --model mnist-pixels --prefix pixels-

- `samples.png`: `sundae-train sample` (one image per file), recomposed one row per class 0..9.
- `inpainting.png`: `sundae-train inpaint --box 0,14,28,14` on held-out digits (data/mnist_test_1k.npz,
  never trained on): per row the original, the mask (white = regenerate) and four completions
  with the digit's true class.
- `steps.png`: the same seed and classes at 10 / 25 / 50 / 100 sampling steps, one row each.

The CLI writes the pieces to a scratch folder (runs/docs-images); this script only lays them out
(nearest-neighbour upscaling, a label column).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SCALE = 3
PAD = 2
LABEL_W = 44


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "comfyui_sundae.trainer", "--log-level", "warning", *args]
    print("$ sundae-train " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def upscale(img: Image.Image) -> Image.Image:
    return img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST)


def tile_row(tiles: list[Image.Image]) -> Image.Image:
    w, h = tiles[0].size
    row = Image.new("L", (len(tiles) * (w + PAD) + PAD, h + 2 * PAD), 0)
    for i, t in enumerate(tiles):
        row.paste(t, (PAD + i * (w + PAD), PAD))
    return row


def stack(rows: list[Image.Image], labels: list[str]) -> Image.Image:
    """Rows (same width) under each other, each with a text label on the left; white labels on black."""
    width = max(r.width for r in rows) + LABEL_W
    out = Image.new("L", (width, sum(r.height for r in rows)), 0)
    draw = ImageDraw.Draw(out)
    y = 0
    for r, text in zip(rows, labels, strict=True):
        out.paste(r, (LABEL_W, y))
        draw.text((4, y + r.height // 2 - 6), text, fill=255)
        y += r.height
    return out


def samples(model: str, work: Path, out: Path, *, per_class: int, seed: int) -> None:
    rows = []
    for k in range(10):
        folder = work / f"samples-{k}"
        cli("sample", "-m", model, "--class", str(k), "-n", str(per_class), "--seed", str(seed + k),
            "-b", str(per_class), "--out", str(folder) + "/")
        tiles = [upscale(Image.open(p).convert("L")) for p in sorted(folder.glob("*.png"))[:per_class]]
        rows.append(tile_row(tiles))
    stack(rows, [f"{k}" for k in range(10)]).save(out)


def inpainting(model: str, work: Path, out: Path, *, digits: list[int], num: int, seed: int) -> None:
    data = np.load(REPO / "data" / "mnist_test_1k.npz")
    images, labels = data["images"], data["labels"]
    rows, names = [], []
    for j, idx in enumerate(digits):
        src = work / f"heldout-{idx}.png"
        Image.fromarray(images[idx]).save(src)
        grid = work / f"inpaint-{idx}.png"
        cli("inpaint", "-m", model, "-i", str(src), "--box", "0,14,28,14", "--class", str(int(labels[idx])),
            "-n", str(num), "--seed", str(seed + j), "--out", str(grid))
        rows.append(upscale(Image.open(grid).convert("L")))
        names.append(f"{int(labels[idx])}")
    stack(rows, names).save(out)


def steps(model: str, work: Path, out: Path, *, seed: int) -> None:
    rows, names = [], []
    for s in (10, 25, 50, 100):
        grid = work / f"steps-{s}.png"
        cli("sample", "-m", model, "-n", "10", "--seed", str(seed), "--steps", str(s), "-b", "10",
            "--out", str(grid))
        rows.append(upscale(Image.open(grid).convert("L")))
        names.append(f"{s}")
    stack(rows, names).save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-vq", help="mnist-vq, mnist-pixels or a prior file")
    ap.add_argument("--out-dir", default=str(REPO / "docs"))
    ap.add_argument("--prefix", default="", help="prefix for the output file names")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("samples", "inpainting", "steps"), action="append")
    args = ap.parse_args()
    work = REPO / "runs" / "docs-images"
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = args.only or ["samples", "inpainting", "steps"]
    if "samples" in todo:
        samples(args.model, work, out_dir / f"{args.prefix}samples.png", per_class=args.per_class, seed=args.seed)
    if "inpainting" in todo:
        # held-out digits: the first occurrence of a 2, 3, 5, 7 and 9 (classes whose bottom half matters)
        labels = np.load(REPO / "data" / "mnist_test_1k.npz")["labels"]
        digits = [int(np.flatnonzero(labels == k)[0]) for k in (2, 3, 5, 7, 9)]
        inpainting(args.model, work, out_dir / f"{args.prefix}inpainting.png", digits=digits, num=4, seed=args.seed)
    if "steps" in todo:
        steps(args.model, work, out_dir / f"{args.prefix}steps.png", seed=args.seed)
    print(f"wrote {', '.join(todo)} to {out_dir}")


if __name__ == "__main__":
    main()
