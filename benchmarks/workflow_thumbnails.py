"""Thumbnails for `workflows/*.json` from what the workflows really produced in ComfyUI.

Run the example workflows in a real ComfyUI server first, keeping its output folder, e.g. with
the server test (it queues every workflow against the shipped models):

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfyui_server.py --basetemp=/tmp/cs
    python benchmarks/workflow_thumbnails.py /tmp/cs/comfyui-server0/output

For every workflow the card shows its input image (if it loads one), the images its SaveImage
node wrote (`<prefix>_00001_.png`, ...; nearest-neighbour upscaled, nothing else changed), the
sampler settings read from the workflow file, and its node chain in execution order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
W, H = 512, 384
BG, FG, ACC, DIM = (24, 26, 33), (235, 235, 240), (255, 176, 59), (120, 125, 140)
SKIP = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
CORE_NAMES = {"LoadImage": "Load Image", "SaveImage": "Save Image", "InvertMask": "Invert Mask",
              "ImageCompositeMasked": "Composite Masked", "ImagePadForOutpaint": "Pad for Outpainting"}
TITLES = {"unconditional": "Unconditional", "class-conditional": "Class-conditional",
          "inpainting": "Inpainting", "variations": "Variations", "outpainting": "Outpainting",
          "emoji-by-category": "Emoji by category", "emoji-inpainting": "Emoji inpainting"}
# SundaeSampler widget order (seed, control, steps, T start, T end, p start, p end, early stop,
# batch, class, cfg, strength, ...), as the workflow files store it
SAMPLER_WIDGETS = ("seed", "control", "steps", "t0", "t1", "p0", "p1", "early_stop", "batch",
                   "class", "cfg", "strength")


def font(size: int):
    return ImageFont.load_default(size=size)


def node_chain(wf: dict) -> list[str]:
    """Node titles in execution (topological) order, frontend-only nodes left out."""
    nodes = {n["id"]: n for n in wf["nodes"] if n["type"] not in SKIP}
    deps = {i: set() for i in nodes}
    for _lid, origin, _os, target, _ts, _typ in wf["links"]:
        if origin in nodes and target in nodes:
            deps[target].add(origin)
    order, done = [], set()
    while len(order) < len(nodes):
        ready = sorted((i for i in nodes if i not in done and deps[i] <= done),
                       key=lambda i: (nodes[i].get("order", 0), i))
        if not ready:
            raise ValueError("workflow graph has a cycle")
        for i in ready:
            order.append(i)
            done.add(i)
    from comfyui_sundae.nodes import NODE_DISPLAY_NAME_MAPPINGS

    names = {**CORE_NAMES, **NODE_DISPLAY_NAME_MAPPINGS}
    return [nodes[i].get("title") or names.get(nodes[i]["type"], nodes[i]["type"]) for i in order]


def widgets(wf: dict, node_type: str) -> list:
    for n in wf["nodes"]:
        if n["type"] == node_type:
            return n.get("widgets_values", [])
    return []


def sampler_settings(prior_name: str, s: dict):
    """The settings the sampler node used: its widgets, the prior's recorded value where one is 0
    (as ``nodes.sampler_node._settings``)."""
    from comfyui_sundae.sundae_lib import SamplingDefaults, load_prior

    rec = SamplingDefaults.from_prior(load_prior(prior_name))
    return rec.merged(steps=s["steps"] or None, cfg_scale=s["cfg"] or None,
                      temperature=(s["t0"] or rec.temperature[0], s["t1"] or rec.temperature[1]))


def tile(img: Image.Image, height: int) -> Image.Image:
    scale = max(1, height // img.height)
    return img.convert("RGB").resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def card(title: str, chain: list[str], inp: Image.Image | None, outs: list[Image.Image], caption: str,
         inp_caption: str) -> Image.Image:
    im = Image.new("RGB", (W, H), BG)
    dr = ImageDraw.Draw(im)
    dr.text((20, 14), "SUNDAE", font=font(15), fill=ACC)
    dr.text((20, 32), title, font=font(30), fill=FG)
    # one row: [input ->] outputs, at the largest integer scale that fits
    row = ([inp] if inp is not None else []) + outs
    gap, arrow = 10, 26 if inp is not None else 0
    for height in (112, 84, 56, 28):
        tiles = [tile(t, height) for t in row]
        if sum(t.width for t in tiles) + gap * (len(tiles) - 1) + arrow <= W - 40:
            break
    x = (W - (sum(t.width for t in tiles) + gap * (len(tiles) - 1) + arrow)) // 2
    y = 92
    for i, t in enumerate(tiles):
        im.paste(t, (x, y))
        if i == 0 and inp is not None:
            dr.text((x, y + t.height + 6), inp_caption, font=font(12), fill=DIM)
            x += t.width + gap
            cy = y + t.height / 2
            dr.line([x, cy, x + 12, cy], fill=ACC, width=3)
            dr.polygon([(x + 12, cy - 6), (x + 19, cy), (x + 12, cy + 6)], fill=ACC)
            x += arrow
        else:
            x += t.width + gap
    dr.text((20, y + max(t.height for t in tiles) + 28), caption, font=font(13), fill=DIM)
    # node chain, wrapped
    widths = [dr.textlength(n, font=font(12)) + 12 for n in chain]
    rows, cur = [], []
    for name, w_ in zip(chain, widths, strict=True):
        if cur and sum(c[1] for c in cur) + 16 * len(cur) + w_ > W - 40:
            rows.append(cur)
            cur = []
        cur.append((name, w_))
    rows.append(cur)
    yy = H - 12 - 32 * len(rows)
    for r_i, r in enumerate(rows):
        xx = 20
        for i, (name, w_) in enumerate(r):
            dr.rounded_rectangle([xx, yy, xx + w_, yy + 24], radius=6, fill=(44, 48, 60), outline=(70, 76, 92))
            dr.text((xx + 6, yy + 5), name, font=font(12), fill=FG)
            xx += w_
            if i < len(r) - 1 or r_i < len(rows) - 1:
                dr.text((xx + 4, yy + 3), "›", font=font(16), fill=DIM)
                xx += 16
        yy += 32
    return im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", type=Path, help="ComfyUI output folder after running the workflows")
    ap.add_argument("--max-images", type=int, default=4, help="output images per card")
    ap.add_argument("--only", nargs="*", metavar="NAME", help="only these workflows (file stems)")
    args = ap.parse_args()
    from comfyui_sundae.sundae_lib import labels

    for path in sorted(WORKFLOWS.glob("*.json")):
        if args.only and path.stem not in args.only:
            continue
        wf = json.loads(path.read_text())
        prefix = widgets(wf, "SaveImage")[0]
        folder, stem = (args.outputs / prefix).parent, Path(prefix).name
        files = sorted(folder.glob(f"{stem}_*.png"))
        if not files:
            raise SystemExit(f"{path.name}: no '{prefix}_*.png' in {args.outputs}; run the workflows in "
                             "ComfyUI with that output folder first (see this script's docstring)")
        outs = [Image.open(f) for f in files[: args.max_images]]
        load = widgets(wf, "LoadImage")
        inp = Image.open(WORKFLOWS / load[0]) if load else None
        if inp is not None and inp.mode == "RGBA":  # show the painted hole as grey
            bg = Image.new("RGBA", inp.size, (128, 128, 128, 255))
            inp = Image.alpha_composite(bg, inp)
        s = dict(zip(SAMPLER_WIDGETS, widgets(wf, "SundaeSampler"), strict=False))  # + width, height
        prior = widgets(wf, "SundaeLoadPrior")[0].removesuffix(".safetensors")
        used = sampler_settings(prior, s)
        klass = str(s.get("class", "none")).strip()
        null = klass.lower() in labels.NULL_WORDS
        klass = "any class" if null else f"class {klass}"
        # a recorded cfg (widget 0) is skipped for the null class: nothing to guide towards
        guide = "no guidance" if null and not float(s.get("cfg") or 0) else f"cfg {used.cfg_scale:g}"
        caption = (f"real ComfyUI output: {prior}, {used.steps} steps, T {used.temperature[0]:g}->"
                   f"{used.temperature[1]:g}, {guide}, {klass}"
                   + (f", strength {s['strength']}" if s.get("strength", 1) != 1 else ""))
        holes = inp is not None and load and ("holes" in load[0] or Image.open(WORKFLOWS / load[0]).mode == "RGBA")
        inp_caption = "input (grey = hole)" if holes else "input"
        im = card(TITLES.get(path.stem, path.stem), node_chain(wf), inp, outs, caption, inp_caption)
        im.save(path.with_suffix(".jpg"), quality=92)
        print(f"{path.with_suffix('.jpg').relative_to(REPO)}: {len(outs)} of {len(files)} images from {folder}")


if __name__ == "__main__":
    main()
