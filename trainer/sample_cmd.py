"""``sundae-train sample`` / ``inpaint`` / ``env``.

Model resolution: ``--model`` is a prior file, ``hf://...``, or one of the shipped names
(``mnist-vq`` = default, ``mnist-pixels``, ``emoji``) under ``<package>/shipped_models/sundae/``. The codec
comes from ``--vqgan`` or from what the prior records in its metadata (``sundae.codec``:
``pixel:levels=..,channels=..`` or ``vqgan:sha256=..`` with ``sundae.vqgan_file``, looked up
beside the prior, in a sibling ``vqgan/`` folder and in ``shipped_models/vqgan/``). Sampler
settings not given as options come from what the prior records (``sundae.sampling``; the
library's ``SamplingDefaults`` when it records nothing): ``sample()`` fills them in. Classes are
ids or names of the prior's label map, resolved by ``sundae_lib.labels``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from pathlib import Path

import torch

from .config import PACKAGE_ROOT

logger = logging.getLogger(__name__)

SHIPPED = PACKAGE_ROOT / "shipped_models"
SHIPPED_PRIORS = {"mnist-vq": "mnist-vq.safetensors", "mnist-pixels": "mnist-pixels.safetensors", "emoji": "emoji.safetensors"}
DEFAULT_MODEL = "mnist-vq"


def resolve_model_path(model: str | None) -> str:
    """``--model`` value -> a path or hf:// source (shipped names resolved, with a clear error
    when the shipped file is missing)."""
    name = model or DEFAULT_MODEL
    if name in SHIPPED_PRIORS:
        path = SHIPPED / "sundae" / SHIPPED_PRIORS[name]
        if not path.is_file():
            raise FileNotFoundError(
                f"the shipped prior '{name}' is missing: expected {str(path)!r}. Reinstall "
                "comfyui-sundae (the file ships with the package), or pass --model PATH to a prior "
                "you trained (sundae-train prior --config " + name + ")"
            )
        return str(path)
    if name.startswith("hf://"):
        return name
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"--model {name!r}: no such file; give a prior .safetensors, hf://owner/repo/file, or a "
            f"shipped name ({', '.join(SHIPPED_PRIORS)})"
        )
    return str(path)


def resolve_codec(prior, prior_source: str, vqgan: str | None):
    """The codec for ``prior``: ``--vqgan`` if given, else the one its metadata records. A codec
    whose factor or channels differ from what the prior records is an error; another VQ-GAN
    file (sha256) of the same shape is a warning (sundae_lib.codec_spec)."""
    from ..sundae_lib import PixelCodec, load_vqgan
    from ..sundae_lib._helpers import is_hf_source, source_sha256
    from ..sundae_lib.codec_spec import CodecSpec, check_codec_pairing
    from ..sundae_lib.prior_metadata import META_VQGAN_SOURCE, metadata_of

    meta = metadata_of(prior)
    spec = CodecSpec.from_metadata(meta)  # strict: a malformed codec record is an error here
    sha = None
    if vqgan:
        codec = PixelCodec.from_spec(vqgan) if vqgan.startswith("pixel") else load_vqgan(vqgan)
        name = vqgan
        if spec is not None and spec.sha256 and not vqgan.startswith("pixel") and not is_hf_source(vqgan):
            sha = source_sha256(vqgan)
    else:
        if spec is not None and spec.kind == "pixel":
            codec, name = PixelCodec(levels=spec.levels, channels=spec.channels), str(spec)
        elif spec is not None and spec.kind == "vqgan":
            name = spec.file or ""
            if not name:
                raise ValueError(f"the prior {prior_source!r} records a VQ-GAN hash but no file name; pass --vqgan FILE")
            here = Path(prior_source).parent if not prior_source.startswith("hf://") else None
            candidates = [SHIPPED / "vqgan" / name]
            if here is not None:
                candidates = [here / name, here.parent / "vqgan" / name, *candidates]
            recorded = meta.get(META_VQGAN_SOURCE, "")
            if recorded and not recorded.startswith("hf://"):
                candidates.append(Path(recorded))
            codec = None
            for cand in candidates:
                if cand.is_file():
                    if spec.sha256 and source_sha256(cand) != spec.sha256:
                        logger.warning("%s has another sha256 than the prior records; skipping it", cand)
                        continue
                    codec, name, sha = load_vqgan(str(cand)), str(cand), spec.sha256
                    break
            if codec is None:
                raise FileNotFoundError(
                    f"the prior was trained on tokens of the VQ-GAN {name!r} (sha256 {(spec.sha256 or '')[:12]}...), "
                    f"which is not at {', '.join(str(c) for c in candidates)}; pass --vqgan FILE"
                )
        else:
            raise ValueError(
                f"the prior {prior_source!r} does not record its codec (no 'sundae.codec' metadata); "
                "pass --vqgan FILE (a VQ-GAN) or --vqgan pixel:levels=256,channels=1"
            )
    if int(codec.codebook_size) != int(prior.codebook_size):
        raise ValueError(
            f"the prior has {prior.codebook_size} codes but the codec has {codec.codebook_size}; use "
            "the VQ-GAN (or pixel levels) the prior was trained on"
        )
    for warning in check_codec_pairing(spec, codec, prior_name=prior_source, codec_name=name, codec_sha256=sha):
        logger.warning(warning)
    return codec.eval()


def _schedule(text: str | None) -> float | tuple[float, float] | None:
    """``--temperature`` / ``--update-proportion``: ``T`` or ``START,END``; None when not given."""
    if text is None:
        return None
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r}: expected a number or START,END (e.g. 1.0,0.7)") from None
    if len(values) == 1:
        return values[0]
    if len(values) != 2:
        raise ValueError(f"{text!r}: expected a number or START,END, got {len(values)} values")
    return tuple(values)


def _labels(klass: str | int | None, prior, n: int) -> torch.Tensor | None:
    """``--class`` -> labels ``[n]``: an id, a name of the prior's label map or 'null' for all;
    not given: cycle through the classes (None for an unconditional prior)."""
    from ..sundae_lib.labels import resolve_class

    if klass is None:
        return torch.arange(n) % int(prior.num_classes) if prior.num_classes else None
    index = resolve_class(prior, klass, where="--class")
    return torch.full((n,), index, dtype=torch.long) if prior.num_classes else None


@torch.no_grad()
def guess_class(prior, tokens: torch.Tensor, mask: torch.Tensor, *, seed: int = 0, draws: int = 4,
                keep_share: float = 0.5) -> tuple[int, list[float]]:
    """The class under which ``prior`` finds the kept (unmasked) tokens most likely: each draw
    replaces the masked tokens and a random ``keep_share`` of the kept ones by random codes, and
    scores every class by the mean log-probability the prior gives the true values of those
    corrupted kept tokens (a denoising estimate of log p(kept part | class)). ``tokens``
    ``[1, h, w]``, ``mask`` ``[1, h, w]`` bool (True = regenerate). Returns ``(class, scores)``."""
    num, k = int(prior.num_classes), int(prior.codebook_size)
    dev = tokens.device
    gen = torch.Generator().manual_seed(seed)
    t0 = tokens.reshape(1, *tokens.shape[-2:]).long().cpu()
    m = mask.reshape(1, *mask.shape[-2:]).bool().cpu()
    totals = torch.zeros(num, dtype=torch.float64)
    for _ in range(draws):
        hide = m | ((torch.rand(t0.shape, generator=gen) < keep_share) & ~m)
        scored = hide & ~m
        if not scored.any():
            scored = ~m
        noisy = torch.where(hide, torch.randint(0, k, t0.shape, generator=gen), t0)
        batch = noisy.expand(num, -1, -1).to(dev)
        logp = torch.log_softmax(prior(batch, torch.arange(num, device=dev)).float(), dim=-1)
        true = logp.gather(-1, t0.expand(num, -1, -1).to(dev)[..., None])[..., 0].cpu()
        totals += true[:, scored[0]].double().mean(dim=1)
    scores = (totals / draws).tolist()
    return int(max(range(num), key=lambda c: scores[c])), scores


def prior_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``--precision`` -> the dtype the prior's weights run in: ``auto`` =
    ``sundae_lib.preferred_dtype(device)``; explicit choices as asked (with the trainer's checks:
    a warning for bf16 on a CPU without fast bf16, an error for bf16 on a GPU without it)."""
    from .runtime import resolve_precision

    dtype, _ = resolve_precision(precision, device)
    return dtype or torch.float32


def _setup(model, vqgan, device, precision="auto", compile_prior=False):
    from ..sundae_lib import load_prior
    from ..sundae_lib.dtypes import dtype_name
    from .dist import pick_device

    dev = pick_device(device)
    source = resolve_model_path(model)
    dtype = prior_dtype(precision, dev)
    # the prior runs in `dtype` (the sampler casts its logits to fp32); the codec stays fp32
    prior = load_prior(source).to(device=dev, dtype=dtype).eval()
    logger.info("prior on %s in %s (--precision %s)", dev, dtype_name(dtype), precision)
    codec = resolve_codec(prior, source, vqgan).to(dev)
    if compile_prior:
        from ..sundae_lib import compile_prior as compile_fn

        prior = compile_fn(prior)  # attributes still read from the prior; forwards compiled
        logger.info("prior compiled with torch.compile (the first step of each new shape compiles)")
    return prior, codec, dev


def _sampler_kwargs(prior, steps, temperature, update_proportion, min_steps, early_stop, cfg_scale) -> dict:
    """The sampler options as ``sample()`` arguments: None (not given) leaves the setting to the
    prior's record. Logs the settings that will be used."""
    from ..sundae_lib import SamplingDefaults

    given = {"steps": steps, "temperature": _schedule(temperature),
             "update_proportion": _schedule(update_proportion), "min_steps": min_steps,
             "early_stop": early_stop, "cfg_scale": cfg_scale}
    logger.info("sampling: %s (options not given: the prior's recorded settings)",
                SamplingDefaults.from_prior(prior).merged(**given).describe())
    return given


def _write(images: torch.Tensor, out: str, *, nrow: int | None = None) -> list[Path]:
    from .runtime import save_grid, save_images

    path = Path(out)
    if path.suffix.lower() == ".png":
        return [save_grid(images, path, nrow=nrow)]
    return save_images(images, path)


@torch.no_grad()
def run_sample(*, num: int, grid: str | None, out: str, model, vqgan, seed, steps, temperature,
               update_proportion, min_steps, early_stop, klass, cfg_scale, batch_size, device,
               precision="auto", compile_prior=False) -> list[Path]:
    from ..sundae_lib import sample

    if num < 1 or batch_size < 1:
        raise ValueError(f"--num ({num}) and --batch-size ({batch_size}) must be >= 1")
    prior, codec, dev = _setup(model, vqgan, device, precision, compile_prior)
    token_grid = tuple(prior.config.grid)
    if grid:
        try:
            h, w = (int(v) for v in grid.lower().split("x"))
        except ValueError:
            raise ValueError(f"--grid {grid!r}: expected HxW in tokens, e.g. 16x16") from None
        token_grid = (h, w)
    kwargs = _sampler_kwargs(prior, steps, temperature, update_proportion, min_steps, early_stop, cfg_scale)
    labels = _labels(klass, prior, num)
    gen = torch.Generator(device=dev).manual_seed(seed)
    images = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        lab = labels[start : start + b].to(dev) if labels is not None else None
        tokens = sample(prior, batch_size=b, grid=token_grid, labels=lab, generator=gen, **kwargs)
        images.append(codec.decode(tokens).float().cpu())
    x = torch.cat(images)
    nrow = prior.num_classes if (klass is None and prior.num_classes and num % prior.num_classes == 0) else None
    return _write(x, out, nrow=nrow)


def _open_image(path: str, option: str):
    """A PIL image loaded into memory, or a ``ValueError`` naming the option and the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(
            f"{option} {str(path)!r} is not an image that can be read ({type(exc).__name__}: {exc}); "
            "give a PNG, JPEG, WebP or another format Pillow reads"
        ) from None


def _load_image(path: str, channels: int, resize: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    from .data import to_8bit

    img = to_8bit(_open_image(path, "--image")).convert("L" if channels == 1 else "RGB")
    if resize:
        w, h = img.size
        s = resize / min(w, h)
        img = img.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - resize) // 2, (h - resize) // 2
        img = img.crop((left, top, left + resize, top + resize))
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0


def _pixel_mask(mask: str | None, box: str | None, size: tuple[int, int]) -> torch.Tensor:
    """Float [H, W] in 0..1, 1 = regenerate."""
    import numpy as np

    h, w = size
    if box:
        try:
            x, y, bw, bh = (int(v) for v in box.split(","))
        except ValueError:
            raise ValueError(f"--box {box!r}: expected X,Y,W,H in pixels, e.g. 0,14,28,14") from None
        if bw < 1 or bh < 1 or x < 0 or y < 0 or x + bw > w or y + bh > h:
            raise ValueError(
                f"--box {box!r} (pixels x {x}..{x + bw - 1}, y {y}..{y + bh - 1}) does not lie inside "
                f"the {w}x{h} image (after --resize): X, Y >= 0, W, H >= 1, X+W <= {w} and Y+H <= {h}; "
                "shrink the box or use --mask"
            )
        m = torch.zeros(h, w)
        m[y : y + bh, x : x + bw] = 1.0
        return m
    from .data import to_8bit

    arr = np.asarray(to_8bit(_open_image(mask, "--mask")).convert("L"))
    m = torch.from_numpy(arr.astype(np.float32) / 255.0)
    if tuple(m.shape) != (h, w):
        from ..sundae_lib.masks import resize_mask

        m = resize_mask(m, (h, w))[0]
    return m


@torch.no_grad()
def run_inpaint(*, image, mask, box, rule, grow, resize, composite, num, out, model, vqgan, seed, steps,
                temperature, update_proportion, min_steps, early_stop, klass, cfg_scale, batch_size, device,
                precision="auto", compile_prior=False) -> list[Path]:
    from ..sundae_lib import PixelCodec, sample
    from ..sundae_lib.labels import LabelSpace
    from ..sundae_lib.masks import token_mask_from_pixels

    if num < 1 or batch_size < 1:
        raise ValueError(f"--num ({num}) and --batch-size ({batch_size}) must be >= 1")
    prior, codec, dev = _setup(model, vqgan, device, precision, compile_prior)
    x = _load_image(image, int(codec.in_channels), resize).to(dev)
    H, W = x.shape[-2:]
    pm = _pixel_mask(mask, box, (H, W))
    tokens = codec.encode(x)
    # the pixel mask -> the token mask, once (a pixel codec interleaves its channels along w)
    channels = int(codec.in_channels) if isinstance(codec, PixelCodec) else 1
    tm = token_mask_from_pixels(pm, factor=codec.downsample_factor, grid=tuple(tokens.shape[-2:]), rule=rule,
                                grow=grow, image_size=(H, W), channels=channels).to(dev)
    if not tm.any():
        raise ValueError("the mask covers no token: nothing to inpaint (white = regenerate)")
    kwargs = _sampler_kwargs(prior, steps, temperature, update_proportion, min_steps, early_stop, cfg_scale)
    gen = torch.Generator(device=dev).manual_seed(seed)
    if prior.num_classes and klass in (None, "auto"):
        best, scores = guess_class(prior, tokens, tm, seed=seed)
        space = LabelSpace.of(prior)
        logger.info("--class auto: %s; the kept part's log-likelihood per class: %s", space.name(best),
                    ", ".join(f"{space.name(c)} {v:.3f}" for c, v in enumerate(scores)))
        klass = best  # the id itself: as a string, a label-map name "1" could win over id 1
    labels = _labels(klass, prior, num)
    results = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        lab = labels[start : start + b].to(dev) if labels is not None else None
        toks = sample(prior, batch_size=b, init_tokens=tokens, mask=tm, labels=lab, generator=gen, **kwargs)
        results.append(codec.decode(toks)[..., :H, :W].float())
    res = torch.cat(results)
    pmd = pm.to(dev)
    if composite:
        res = x * (1 - pmd) + res * pmd
    path = Path(out)
    if path.suffix.lower() == ".png":
        shown = (pmd * 2 - 1).expand_as(x[0])[None]
        grid_images = torch.cat([x, shown, res]).cpu()
        return _write(grid_images, out, nrow=len(grid_images))
    return _write(res.cpu(), out)


def environment_report() -> str:
    import importlib.metadata as md

    from ..sundae_lib.dtypes import cuda_has_bf16, dtype_name, preferred_dtype

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    lines = [
        f"comfyui-sundae {version('comfyui-sundae')}",
        f"python         {platform.python_version()} ({platform.platform()})",
        f"torch          {torch.__version__}",
        f"cuda           {torch.version.cuda or 'none (CPU build)'} available={torch.cuda.is_available()}",
        f"cudnn          {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}",
        f"einops         {version('einops')}",
        f"safetensors    {version('safetensors')}",
        f"numpy          {version('numpy')}",
        f"click          {version('click')}",
        f"cpu threads    {torch.get_num_threads()}",
        *_cpu_precision_lines(),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"cuda:{i}         {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                f"bf16={'yes' if cuda_has_bf16(torch.device('cuda', i)) else 'no'}, "
                f"auto dtype {dtype_name(preferred_dtype(torch.device('cuda', i)))}"
            )
    else:
        lines.append("devices        cpu")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("mps            available")
    return "\n".join(lines)


def _cpu_precision_lines() -> list[str]:
    """What ``auto`` picks on the CPU and why: the bf16 instructions found, the measured
    bf16 / fp32 matmul speed ratio, the choice."""
    from ..sundae_lib.dtypes import BENCH_SIZE, ENV_CPU_DTYPE, MIN_SPEEDUP, cpu_bf16_report

    try:
        rep = cpu_bf16_report()
    except ValueError as exc:  # a bad SUNDAE_CPU_DTYPE: show it instead of failing the report
        return [f"cpu auto dtype error: {exc}"]
    flags = " ".join(rep["flags"]) or "none (no AMX / AVX512-BF16)"
    if rep["ratio"] is not None:
        speed = (f"{rep['ratio']:.2f}x fp32 ({BENCH_SIZE}x{BENCH_SIZE} matmul, bf16 needs >= "
                 f"{MIN_SPEEDUP}x)")
    else:
        speed = f"not measured ({rep['reason']})"
    return [
        f"cpu bf16 isa   {flags} (torch cpu capability {rep['torch_capability']})",
        f"cpu bf16 speed {speed}",
        f"cpu auto dtype {rep['dtype']}" + ("" if rep["source"] == "env" else f"  (set {ENV_CPU_DTYPE}=fp32|bf16 to override)"),
    ]


def record_sampling(path: str, *, steps=None, temperature=None, update_proportion=None, min_steps=None,
                    early_stop=None, cfg_scale=None) -> tuple[dict, dict]:
    """Write the given sampling settings into the prior file's ``sundae.sampling`` metadata
    (validated as the trainer's ``[sampling]`` table, a ``SamplingDefaults``; the rest of the
    record, the other metadata and every tensor are kept). Returns ``(before, after)`` records."""
    from ..sundae_lib import load_prior, save_prior
    from ..sundae_lib.prior_metadata import META_SAMPLING
    from .config import SamplingConfig

    prior = load_prior(path)
    raw = (prior.metadata or {}).get(META_SAMPLING)
    try:
        before = json.loads(raw) if raw else {}
        current = SamplingConfig.from_record(before)
    except ValueError as exc:
        logger.warning("%s: the recorded %s is unusable (%s); starting from the defaults", path, META_SAMPLING, exc)
        before, current = {}, SamplingConfig()
    changes = {
        "steps": steps, "min_steps": min_steps, "early_stop": early_stop, "cfg_scale": cfg_scale,
        "temperature": _schedule(temperature), "update_proportion": _schedule(update_proportion),
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return before, before
    after = {**before, **dataclasses.replace(current, **changes).to_record()}
    save_prior(prior, path, metadata={META_SAMPLING: json.dumps(after)})
    return before, after
