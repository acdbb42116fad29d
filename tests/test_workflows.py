"""Every workflow in ``workflows/`` executed the way ComfyUI would run it, without ComfyUI.

The UI-format JSON is converted to the API ("prompt") format exactly as the frontend does (widget
values assigned positionally over the widget inputs in ``input_order``, the control value after a
seed skipped, LoadImage's trailing upload value ignored, links followed, notes dropped), then the
graph is executed with our node classes and small stand-ins for the four core nodes used
(LoadImage, SaveImage, ImageCompositeMasked, ImagePadForOutpaint) inside
``torch.inference_mode()``. ``ui_to_api`` and ``make_standin_models`` are reused by
``test_comfyui_server.py``, which runs the same workflows on a real ComfyUI server.

Models: the shipped files in ``shipped_models/`` when they exist; otherwise tiny random models
with the same names are written to a temporary folder (never into ``shipped_models/``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

MODEL_FILES = {
    "vqgan": ["mnist-vq-f4.safetensors", "emoji-vq.safetensors"],
    "sundae": ["mnist-vq.safetensors", "mnist-pixels.safetensors", "emoji.safetensors"],
}


# --------------------------------------------------------------------------------------------
# stand-in models and inputs
# --------------------------------------------------------------------------------------------


def make_standin_models(root: Path, *, only_missing: bool = True) -> dict[str, Path]:
    """Tiny random models named like the shipped ones, in ``root/vqgan`` and ``root/sundae``.

    With ``only_missing``, files that already exist in ``shipped_models/`` are not made (the
    shipped ones are used). Returns the stand-ins written, by file name."""
    from comfyui_sundae.sundae_lib import (
        VQGAN,
        PriorConfig,
        SundaePrior,
        VQGANConfig,
        save_prior,
        save_vqgan,
    )

    made: dict[str, Path] = {}

    def wanted(folder: str, name: str) -> Path | None:
        if only_missing and (REPO / "shipped_models" / folder / name).is_file():
            return None
        path = root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        made[name] = path
        return path

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        if path := wanted("vqgan", "mnist-vq-f4.safetensors"):
            cfg = VQGANConfig.preset("mnist-f4", ch=8, z_channels=8, embed_dim=8, norm_groups=4)
            save_vqgan(VQGAN(cfg), path)
        tiny = dict(dim=32, heads=2, dim_head=16, depth=(1, 1, 1), ff_mult=2)
        if path := wanted("sundae", "mnist-vq.safetensors"):
            prior = SundaePrior(PriorConfig(codebook_size=256, grid=(7, 7), num_classes=10, **tiny))
            save_prior(prior, path, metadata={"sundae.codec": "vqgan:file=mnist-vq-f4.safetensors,factor=4"})
        if path := wanted("vqgan", "emoji-vq.safetensors"):
            cfg = VQGANConfig.preset("tiny", resolution=64, ch_mult=(1, 2, 2), attn_resolutions=(), n_embed=512)
            save_vqgan(VQGAN(cfg), path)
        if path := wanted("sundae", "emoji.safetensors"):
            prior = SundaePrior(PriorConfig(codebook_size=512, grid=(16, 16), num_classes=9, **tiny))
            save_prior(prior, path, metadata={"sundae.codec": "vqgan:file=emoji-vq.safetensors,factor=4"})
        if path := wanted("sundae", "mnist-pixels.safetensors"):
            prior = SundaePrior(PriorConfig(codebook_size=256, grid=(28, 28), num_classes=10, **tiny))
            save_prior(prior, path, metadata={"sundae.codec": "pixel:levels=256,channels=1"})
    return made


def install_example_inputs(input_dir: Path) -> list[str]:
    """Copy the example images that ship beside the workflows into an input directory."""
    input_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for png in sorted(WORKFLOW_DIR.glob("*.png")):
        shutil.copy(png, input_dir / png.name)
        names.append(png.name)
    return names


# --------------------------------------------------------------------------------------------
# UI -> API conversion (the frontend's graphToPrompt, for the features our workflows use)
# --------------------------------------------------------------------------------------------


def object_info_for(cls) -> dict:
    """The ``/object_info`` entry parts used by the conversion, built from a V1 node class."""
    spec = cls.INPUT_TYPES()
    return {
        "input": {k: v for k, v in spec.items() if k in ("required", "optional")},
        "input_order": {k: list(v) for k, v in spec.items() if k in ("required", "optional")},
    }


def widget_inputs(info: dict) -> list[tuple[str, dict]]:
    """(name, options) of the widget inputs in input order."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info["input_order"].get(section, []):
            spec = specs[name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                out.append((name, opts))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API prompt ``{id: {class_type, inputs, _meta}}``."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node.get("mode", 0) == 0, f"node {node['id']} is muted or bypassed; not supported here"
        info = object_info[node["type"]]
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, opts in widget_inputs(info):
            assert i < len(values), f"node {node['id']} ({node['type']}): no widget value for {name!r}"
            inputs[name] = values[i]
            i += 1
            if opts.get("control_after_generate") or name in ("seed", "noise_seed"):
                i += 1  # the UI-only fixed/increment/decrement/randomize value
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            _, origin, slot, _target, _tslot, _type = links[inp["link"]]
            assert nodes[origin]["type"] != "Reroute", "Reroute nodes are not used by our workflows"
            inputs[inp["name"]] = [str(origin), slot]
        prompt[str(node["id"])] = {
            "class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node["type"])},
        }
    return prompt


def make_fast(prompt: dict, *, steps: int = 6, batch_size: int = 2) -> dict:
    """Cap the sampler's steps and batch size (CPU test budget); everything else as shipped (steps
    0, the prior's recommended number, counts as above the cap)."""
    for node in prompt.values():
        if node["class_type"] == "SundaeSampler":
            inp = node["inputs"]
            inp["steps"] = min(int(inp["steps"]) or steps, steps)
            inp["batch_size"] = min(int(inp["batch_size"]), batch_size)
    return prompt


# --------------------------------------------------------------------------------------------
# stand-ins for the core nodes, and an executor
# --------------------------------------------------------------------------------------------


class LoadImage:
    """ComfyUI's LoadImage: RGB IMAGE, MASK = 1 - alpha, or a 64x64 zero mask without alpha."""

    input_dir: Path

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (sorted(p.name for p in cls.input_dir.glob("*.png")), {"image_upload": True})}}

    def load_image(self, image):
        img = Image.open(self.input_dir / image)
        rgb = torch.from_numpy(np.array(img.convert("RGB")).astype(np.float32) / 255.0)[None]
        if "A" in img.getbands():
            mask = 1.0 - torch.from_numpy(np.array(img.getchannel("A")).astype(np.float32) / 255.0)
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
        return rgb, mask[None]


class SaveImage:
    output_dir: Path

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save_images(self, images, filename_prefix="ComfyUI"):
        results = []
        for i, image in enumerate(images):
            arr = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            path = self.output_dir / f"{filename_prefix}_{i:05}_.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            results.append(str(path))
        return {"ui": {"images": results}, "result": (images,)}


class ImageCompositeMasked:
    """ComfyUI's ImageCompositeMasked at x = y = 0: the destination's batch decides the output
    batch (the source and mask are repeated or cut to it); ``source`` where mask = 1."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"destination": ("IMAGE",), "source": ("IMAGE",), "x": ("INT", {}), "y": ("INT", {}),
                         "resize_source": ("BOOLEAN", {})},
            "optional": {"mask": ("MASK",)},
        }

    def composite(self, destination, source, x, y, resize_source, mask=None):
        assert (x, y, resize_source) == (0, 0, False), "stand-in supports the pasting used by our workflows"
        b = destination.shape[0]
        dst = destination.clone()
        src = _to_batch(source, b)[:, : dst.shape[1], : dst.shape[2]]
        m = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=src.shape[1:3], mode="bilinear")
        m = _to_batch(m, b).permute(0, 2, 3, 1)
        h, w = src.shape[1:3]
        dst[:, :h, :w] = m * src + (1 - m) * dst[:, :h, :w]
        return (dst,)


def _to_batch(t: torch.Tensor, b: int) -> torch.Tensor:
    """comfy.utils.repeat_to_batch_size"""
    if t.shape[0] >= b:
        return t[:b]
    return t.repeat(-(-b // t.shape[0]), *([1] * (t.ndim - 1)))[:b]


class InvertMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    def invert(self, mask):
        return (1.0 - mask,)


class ImagePadForOutpaint:
    @classmethod
    def INPUT_TYPES(cls):
        ints = {k: ("INT", {}) for k in ("left", "top", "right", "bottom", "feathering")}
        return {"required": {"image": ("IMAGE",), **ints}}

    def expand_image(self, image, left, top, right, bottom, feathering):
        assert feathering == 0, "stand-in supports feathering 0 (what our workflows use)"
        b, h, w, c = image.shape
        out = torch.full((b, h + top + bottom, w + left + right, c), 0.5)
        out[:, top:top + h, left:left + w] = image
        mask = torch.ones(h + top + bottom, w + left + right)
        mask[top:top + h, left:left + w] = 0
        return out, mask[None]


CORE = {"LoadImage": LoadImage, "SaveImage": SaveImage, "ImageCompositeMasked": ImageCompositeMasked,
        "ImagePadForOutpaint": ImagePadForOutpaint, "InvertMask": InvertMask}
CORE_FUNCTIONS = {"LoadImage": "load_image", "SaveImage": "save_images", "ImageCompositeMasked": "composite",
                  "ImagePadForOutpaint": "expand_image", "InvertMask": "invert"}


def execute(prompt: dict, classes: dict) -> dict[str, tuple]:
    """Run an API prompt: each node once, after its inputs; returns outputs by node id."""
    outputs: dict[str, tuple] = {}
    pending = dict(prompt)
    with torch.inference_mode():
        while pending:
            ready = [nid for nid, n in pending.items()
                     if all(not isinstance(v, list) or v[0] in outputs for v in n["inputs"].values())]
            assert ready, f"cycle or dangling link among {sorted(pending)}"
            for nid in ready:
                node = pending.pop(nid)
                cls = classes[node["class_type"]]
                kwargs = {k: (outputs[v[0]][v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
                fn = getattr(cls(), CORE_FUNCTIONS.get(node["class_type"]) or cls.FUNCTION)
                result = fn(**kwargs)
                outputs[nid] = result["result"] if isinstance(result, dict) else result
    return outputs


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    from comfyui_sundae.nodes import NODE_CLASS_MAPPINGS, comfy_adapter

    root = tmp_path_factory.mktemp("sundae-wf")
    make_standin_models(root / "models")
    LoadImage.input_dir = root / "input"
    SaveImage.output_dir = root / "output"
    install_example_inputs(LoadImage.input_dir)
    saved = {k: list(v) for k, v in comfy_adapter._fallback_folders.items()}
    for folder in ("vqgan", "sundae"):
        comfy_adapter.add_model_folder(folder, root / "models" / folder)  # after shipped_models
    classes = {**NODE_CLASS_MAPPINGS, **CORE}
    info = {name: object_info_for(cls) for name, cls in classes.items()}
    yield classes, info, root
    comfy_adapter._fallback_folders.clear()
    comfy_adapter._fallback_folders.update(saved)


def test_workflow_folder_is_complete():
    names = {p.stem for p in WORKFLOWS}
    assert {"unconditional", "class-conditional", "inpainting", "variations", "outpainting"} <= names
    for wf in WORKFLOWS:
        thumb = wf.with_suffix(".jpg")
        assert thumb.is_file(), f"{wf.name} has no thumbnail {thumb.name}"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 128


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_ui_format(path):
    wf = json.loads(path.read_text())
    for key in ("id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in wf, f"{path.name}: missing top-level {key!r}"
    assert wf["version"] == 0.4
    assert wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    assert any(n["type"] in FRONTEND_ONLY and n["widgets_values"][0].strip() for n in wf["nodes"]), "needs a Note"
    by_id = {n["id"]: n for n in wf["nodes"]}
    for lid, origin, oslot, target, tslot, typ in wf["links"]:
        assert lid in by_id[origin]["outputs"][oslot]["links"]
        tin = by_id[target]["inputs"][tslot]
        assert tin["link"] == lid and tin["type"] == typ == by_id[origin]["outputs"][oslot]["type"]


# LiteGraph's layout constants as ComfyUI's frontend 1.27 uses them (src/lib/litegraph: LiteGraph
# NODE_TITLE_HEIGHT / NODE_SLOT_HEIGHT / NODE_WIDGET_HEIGHT / NODE_WIDTH / NODE_TEXT_SIZE, and
# BaseWidget.margin 15 + arrowMargin 6 + arrowWidth 10 each side around minValueWidth 42).
TITLE_H, SLOT_H, WIDGET_H, NODE_W, TEXT_SIZE = 30, 20, 20, 140, 14
WIDGET_PADDING = 42 + 2 * (15 + 6 + 10)
IMAGE_PREVIEW_H = 220  # the image preview widget's computeLayoutSize minHeight
IMAGE_PREVIEW_NODES = {"LoadImage", "SaveImage", "PreviewImage"}
LAYOUT_GAP = 0  # px two node rectangles must keep apart (0: touching is allowed, covering is not)


def min_node_size(node: dict) -> tuple[float, float]:
    """The size the frontend gives a node at least (``LGraphNode.computeSize``), from the JSON alone.

    On load the frontend grows every node to ``max(stored size, computeSize())`` (``app.ts``
    ``loadGraphData``), so a smaller stored size is not what users see. computeSize, in graph
    pixels below the title bar:
    ``rows * 20`` for the socket rows (rows = max(inputs that are not widgets, outputs, 1)), then
    ``20 + 4`` per widget and ``8`` after the widgets, then a ``6`` margin. Widgets are counted as the
    serialized ``widgets_values`` (one per widget, the seed's control_after_generate included), plus
    the 220 px image preview that LoadImage and the image-saving nodes show. The width is at least
    ``1.5 * 140`` with widgets (140 without), the widest widget label + the widget padding, and the
    widest input and output labels side by side + two slot widths; text is estimated as the
    frontend's fallback does, ``0.6 * 14`` px per character. Multiline/DOM widgets (Notes) count as
    one 20 px row: their stored sizes are far larger anyway."""
    def text_w(slot: dict) -> float:  # the label as drawn, at the fallback width per character
        return TEXT_SIZE * 0.6 * len(slot.get("label") or slot.get("localized_name") or slot["name"])

    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    sockets = [i for i in inputs if "widget" not in i]
    widget_inputs = [i for i in inputs if "widget" in i]
    n_widgets = len(node.get("widgets_values") or [])
    rows = max(len(sockets), len(outputs), 1)
    height = rows * SLOT_H
    if n_widgets or node["type"] in IMAGE_PREVIEW_NODES:
        height += n_widgets * (WIDGET_H + 4) + 8
        if node["type"] in IMAGE_PREVIEW_NODES:
            height += IMAGE_PREVIEW_H + 4
    height += 6

    in_w = max((text_w(i) for i in sockets), default=0)
    out_w = max((text_w(o) for o in outputs), default=0)
    slots_w = in_w + out_w + 2 * SLOT_H + (5 if in_w and out_w else 0)
    widget_w = max((text_w(i) + WIDGET_PADDING for i in widget_inputs), default=0)
    width = max(slots_w, widget_w, NODE_W * (1.5 if n_widgets else 1))
    return width, height


def node_rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in graph pixels as drawn: title bar above ``pos``, grown size."""
    (x, y), (w, h) = node["pos"], node["size"]
    min_w, min_h = min_node_size(node)
    return x, y - TITLE_H, x + max(w, min_w), y + max(h, min_h)


def node_name(node: dict) -> str:
    return f"node {node['id']} ({node.get('title') or node['type']})"


def test_min_node_size_matches_the_frontend():
    """The estimate against sizes worked out by hand from LiteGraph's computeSize."""
    wf = json.loads((WORKFLOW_DIR / "inpainting.json").read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    # sampler: 3 sockets, 13 widget inputs + the seed's control widget = 14 widgets
    assert min_node_size(by_type["SundaeSampler"])[1] == 3 * 20 + 14 * 24 + 8 + 6 == 410
    # prior_name, dtype, torch_compile
    assert min_node_size(by_type["SundaeLoadPrior"])[1] == 20 + 3 * 24 + 8 + 6 == 106
    assert min_node_size(by_type["SundaeEncode"])[1] == 2 * 20 + 24 + 8 + 6 == 78  # tile_size widget
    assert min_node_size(by_type["LoadImage"])[1] == 2 * 20 + 2 * 24 + 224 + 8 + 6 == 326
    assert min_node_size(by_type["SaveImage"])[1] == 20 + 24 + 224 + 8 + 6 == 282
    assert min_node_size(by_type["InvertMask"]) == (140, 26)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_layout_has_no_overlaps(path):
    """No node (title bar included, at the size the frontend will draw it) covers another: a Note
    over a sampler hides its widgets, a loader under an output socket hides the socket."""
    wf = json.loads(path.read_text())
    nodes = [n for n in wf["nodes"] if not (n.get("flags") or {}).get("collapsed")]
    assert len(nodes) == len(wf["nodes"]), f"{path.name}: collapsed nodes are not expected in examples"
    overlaps = []
    for i, a in enumerate(nodes):
        ax0, ay0, ax1, ay1 = node_rect(a)
        for b in nodes[i + 1:]:
            bx0, by0, bx1, by1 = node_rect(b)
            if ax0 < bx1 + LAYOUT_GAP and bx0 < ax1 + LAYOUT_GAP and ay0 < by1 + LAYOUT_GAP and by0 < ay1 + LAYOUT_GAP:
                overlaps.append(
                    f"{node_name(a)} [{ax0:.0f},{ay0:.0f} .. {ax1:.0f},{ay1:.0f}] overlaps "
                    f"{node_name(b)} [{bx0:.0f},{by0:.0f} .. {bx1:.0f},{by1:.0f}]"
                )
    assert not overlaps, f"{path.name}: node rectangles (title bar included) overlap:\n" + "\n".join(overlaps)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(path, env):
    classes, info, root = env
    wf = json.loads(path.read_text())
    prompt = make_fast(ui_to_api(wf, info))
    outputs = execute(prompt, classes)
    by_type = {}
    for nid, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(nid)

    (save_id,) = by_type["SaveImage"]
    (sampler_id,) = by_type["SundaeSampler"]
    images = outputs[save_id][0]
    s_in = prompt[sampler_id]["inputs"]
    tokens_out = outputs[sampler_id][0]
    n_inputs = 1 if "tokens" in s_in else None
    assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == torch.float32
    assert images.shape[0] == s_in["batch_size"] * (n_inputs or 1)
    assert torch.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert len(list((root / "output").rglob(f"{prompt[save_id]['inputs']['filename_prefix']}_*.png"))) >= images.shape[0]

    if "tokens" not in s_in:  # generation at the prior's trained size: 64x64 emoji, 28x28 digits
        assert tuple(images.shape[1:3]) == ((64, 64) if "emoji" in path.stem else (28, 28))
        (loader_id,) = by_type["SundaeLoadVQGAN"]
        if prompt[loader_id]["inputs"]["vqgan_name"].startswith("pixels"):
            assert torch.equal(images[..., 0], images[..., 1]) and torch.equal(images[..., 0], images[..., 2])
        return

    (encode_id,) = by_type["SundaeEncode"]
    (decode_id,) = by_type["SundaeDecode"]
    encoded = outputs[encode_id][0]
    if "SundaeLatentMask" in by_type:  # inpainting / outpainting: kept tokens and pixels unchanged
        (mask_id,) = by_type["SundaeLatentMask"]
        masked = outputs[mask_id][0]
        keep = ~masked.mask
        assert keep.any() and masked.mask.any(), "the example mask should keep some tokens and regenerate some"
        per_image = s_in["batch_size"]
        keep_out = keep.repeat_interleave(per_image, 0)
        assert torch.equal(tokens_out.tokens[keep_out], masked.tokens.repeat_interleave(per_image, 0)[keep_out])
        (comp_id,) = by_type["ImageCompositeMasked"]
        comp = prompt[comp_id]["inputs"]
        assert comp["destination"] == [decode_id, 0], "the decoded batch must be the destination"
        original = outputs[comp["source"][0]][comp["source"][1]]
        (load_id,) = [i for i in by_type.get("ImagePadForOutpaint", by_type["LoadImage"])]
        pixel_mask = outputs[load_id][1]  # the MASK before Invert Mask: 1 = regenerated
        assert tuple(images.shape[1:3]) == tuple(original.shape[1:3])
        unmasked = pixel_mask[0] == 0
        assert unmasked.any() and (~unmasked).any()
        assert torch.equal(images[:, unmasked], original.expand_as(images)[:, unmasked])
        decoded = outputs[decode_id][0]
        assert torch.equal(images[:, ~unmasked], decoded[:, ~unmasked])  # every result kept its new pixels
    else:  # variations: same grid as the input
        assert tokens_out.grid == encoded.grid
        assert tuple(images.shape[1:3]) == encoded.pixel_size
