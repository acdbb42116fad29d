"""SUNDAE Sampler: generation, class-conditional generation, inpainting and variations.

Sampler settings at 0 (steps, temperatures, update proportions, cfg) take the prior's
recommended value, the one its file records (``SamplingDefaults.from_prior``; the library
defaults for a file that records none); a non-zero widget overrides that one setting. The class
is an id or a name of the prior's label map, resolved by ``sundae_lib.labels``. Tokens and their
mask go to ``sample()`` as they are: the library spreads them over the batch and returns an
empty-mask inpainting unchanged (the mask's whole path: ``sundae_lib.masks``).
"""

from __future__ import annotations

import logging
import time

import torch
from einops import rearrange

from .. import sundae_lib
from ..sundae_lib._helpers import source_sha256
from ..sundae_lib.checks import check_tokens
from ..sundae_lib.codec_spec import CodecSpec, check_codec_pairing
from ..sundae_lib.labels import resolve_class
from ..sundae_lib.prior_metadata import SamplingDefaults
from ..sundae_lib.sampler import can_guide_classes
from . import comfy_adapter as comfy
from .codec_nodes import check_tokens_fit_codec
from .convert import codec_to_image, image_to_pil, tokens_on
from .types import PRIOR_TYPE, TOKENS_TYPE, VQGAN_TYPE, CodecHandle, PriorHandle, TokenBatch

logger = logging.getLogger(__name__)

PREVIEW_INTERVAL_S = 1.0  # decode a live preview at most about once a second
PREVIEW_MAX_SIZE = 512  # pixels per side: the preview decodes every k-th token to stay near this
PREVIEW_BUDGET = 0.1  # a preview may cost at most this fraction of a step (else it gets coarser)
MAX_SIZE = 16384
MIN_STRENGTH = 0.01  # strength 0 would change nothing (the library needs a fraction in (0, 1])
clock = time.monotonic  # tests replace it with a fake clock


def _float(default, lo, hi, step, tooltip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


class SundaeSampler:
    DESCRIPTION = (
        "Samples tokens with a SUNDAE prior: every step proposes new tokens for the whole grid in "
        "parallel. Without tokens it generates images of the given size; with tokens it inpaints "
        "their masked part (Latent Mask) or makes variations (strength below 1). Settings left at 0 "
        "use the prior's recommended values (recorded in its file). Connect the VQ-GAN to see live "
        "previews."
    )
    CATEGORY = "sundae"
    RETURN_TYPES = (TOKENS_TYPE,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("The sampled tokens (decode them with VQ-GAN Decode).",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prior": (PRIOR_TYPE, {"tooltip": "The SUNDAE prior to sample from."}),
                "seed": (
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                     "tooltip": "The random seed; the same seed and settings give the same images."},
                ),
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "Maximum number of denoising steps; 0 = the prior's recommended number; more steps refine further but take longer."}),
                "temperature_start": _float(0.0, 0.0, 5.0, 0.01, "Sampling temperature at the first step; 0 = the prior's recommended value; higher gives more varied, noisier proposals."),
                "temperature_end": _float(0.0, 0.0, 5.0, 0.01, "Sampling temperature at the last step (linear schedule); 0 = the prior's recommended value; lower gives cleaner, less varied results."),
                "update_start": _float(0.0, 0.0, 1.0, 0.01, "Fraction of tokens that may change at the first step; 0 = the prior's recommended value; higher moves faster."),
                "update_end": _float(0.0, 0.0, 1.0, 0.01, "Fraction of tokens that may change at the last step; 0 = the prior's recommended value; lower settles more gently."),
                "early_stop": ("BOOLEAN", {"default": True, "tooltip": "Stop a sample once a step changes none of its tokens (faster); off always runs every step."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Images to generate (per input image when tokens are connected); more takes longer."}),
                "class_label": ("STRING", {"default": "none", "tooltip": "The class for a class-conditional prior: an id (e.g. 7) or a name of the prior's label map (e.g. Animals & Nature); none or -1 = unconditional (the null class)."}),
                "cfg_scale": _float(0.0, 0.0, 30.0, 0.1, "Classifier-free guidance for a class: 0 = the prior's recommended scale, 1 = off, higher follows the class more strongly at the cost of variety."),
                "strength": _float(1.0, MIN_STRENGTH, 1.0, 0.01, "With input tokens: how much may change; 1 regenerates fully (or the whole mask), lower keeps more of the input (variations)."),
                "width": ("INT", {"default": 0, "min": 0, "max": MAX_SIZE, "step": 1, "tooltip": "Image width in pixels when no tokens are connected, rounded to the codec factor; 0 = the prior's trained width; larger gives wider images."}),
                "height": ("INT", {"default": 0, "min": 0, "max": MAX_SIZE, "step": 1, "tooltip": "Image height in pixels when no tokens are connected, rounded to the codec factor; 0 = the prior's trained height; larger gives taller images."}),
            },
            "optional": {
                "tokens": (TOKENS_TYPE, {"tooltip": "Tokens to inpaint (with a Latent Mask) or to vary (strength below 1); leave empty to generate from scratch."}),
                "vqgan": (VQGAN_TYPE, {"tooltip": "Connect the VQ-GAN to see a live preview about once a second and to size images in pixels."}),
            },
        }

    def run(self, prior: PriorHandle, seed: int, steps: int, temperature_start: float, temperature_end: float,
            update_start: float, update_end: float, early_stop: bool, batch_size: int, class_label: str | int,
            cfg_scale: float, strength: float, width: int, height: int,
            tokens: TokenBatch | None = None, vqgan: CodecHandle | None = None):
        comfy.throw_if_interrupted()
        _check_strength(strength, tokens)
        _check_codebooks(prior, vqgan)
        label = resolve_class(prior.model, class_label, where="SundaeSampler: class_label")
        settings, cfg = _settings(prior, steps, (temperature_start, temperature_end), (update_start, update_end),
                                  early_stop, cfg_scale, null_class=label < 0)

        if tokens is not None:
            if vqgan is not None:
                check_tokens_fit_codec(tokens, vqgan, node="SundaeSampler")
            _check_tokens_fit_prior(tokens, prior)
            out, init, mask, grid = tokens, tokens_on(tokens.tokens, prior.device), tokens.mask, tokens.grid
            total = batch_size * tokens.batch_size  # batch_size samples of every input grid, consecutive
        else:
            grid, factor = _grid_for_size(prior, vqgan, width, height)
            out = TokenBatch(
                tokens=torch.zeros(batch_size, *grid, dtype=torch.long), mask=None, factor=factor,
                codec_id=vqgan.codec_id if vqgan is not None else None,
            )
            init = mask = None
            total = batch_size

        # a CPU generator: the same seed gives the same images on every device
        generator = torch.Generator().manual_seed(int(seed))
        callback = _Progress(settings.steps, vqgan, out)
        result = sundae_lib.sample(
            prior.model, batch_size=total, grid=grid, steps=settings.steps, temperature=settings.temperature,
            update_proportion=settings.update_proportion, early_stop=early_stop, labels=label, cfg_scale=cfg,
            init_tokens=init, mask=mask, strength=strength, generator=generator, callback=callback,
            check_interrupt=comfy.throw_if_interrupted,  # Cancel inside a step, between blocks
        )
        callback.finish()
        return (out.replace(tokens=result.to("cpu", torch.long)),)


def _settings(prior: PriorHandle, steps: int, temperature: tuple[float, float], update: tuple[float, float],
              early_stop: bool, cfg_scale: float, *, null_class: bool) -> tuple[SamplingDefaults, float | None]:
    """The widgets over the prior's recommended settings: a widget at 0 takes the recorded value.
    Returns the settings and the cfg to pass (None = the prior's, which ``sample()`` skips where
    guidance has nothing to act on, e.g. the null class)."""
    recorded = SamplingDefaults.from_prior(prior.model)
    settings = recorded.merged(
        steps=steps or None,
        temperature=tuple(v or r for v, r in zip(temperature, recorded.temperature, strict=True)),
        update_proportion=tuple(v or r for v, r in zip(update, recorded.update_proportion, strict=True)),
        early_stop=early_stop, cfg_scale=cfg_scale or None,
    )
    from_prior = [name for name, value in (("steps", steps), ("temperature_start", temperature[0]),
                                          ("temperature_end", temperature[1]), ("update_start", update[0]),
                                          ("update_end", update[1]), ("cfg_scale", cfg_scale)) if not value]
    unguidable = null_class or not can_guide_classes(prior.model)
    skipped = not cfg_scale and unguidable and settings.cfg_scale != 1.0
    why = "the null class" if can_guide_classes(prior.model) else "a prior without a null class"
    logger.info("SundaeSampler: %s%s%s", settings.describe(),
                f" (the recorded guidance does nothing for {why}: skipped)" if skipped else "",
                f" ({', '.join(from_prior)} at 0: the prior's recommended values)" if from_prior else "")
    return settings, cfg_scale or None


def _check_strength(strength: float, tokens: TokenBatch | None) -> None:
    if not MIN_STRENGTH <= strength <= 1.0:
        raise ValueError(
            f"SundaeSampler: strength {strength} is outside {MIN_STRENGTH}..1 — set 1 to regenerate "
            "fully, or a value below 1 (with tokens connected) to keep more of the input"
        )
    if strength < 1.0 and tokens is None:
        raise ValueError(
            f"SundaeSampler: strength {strength} makes variations of input tokens, but no tokens "
            "are connected — connect VQ-GAN Encode's tokens to the 'tokens' input, or set strength "
            "to 1 to generate from scratch"
        )


def _check_codebooks(prior: PriorHandle, vqgan: CodecHandle | None) -> None:
    if vqgan is None:
        return
    if prior.codebook_size != vqgan.codebook_size:
        hint = f" (the prior's file says its codec is '{prior.codec}')" if prior.codec else ""
        raise ValueError(
            f"SundaeSampler: prior {prior.name!r} has {prior.codebook_size} codes but the VQ-GAN "
            f"{vqgan.name!r} has {vqgan.codebook_size} — load the VQ-GAN the prior was trained on{hint}"
        )
    # same codebook size is not enough: factor / channels must match too (a fine-tuned VQ-GAN,
    # another sha256, is only a warning)
    spec = _codec_spec(prior)
    sha = None
    if spec is not None and spec.sha256 and vqgan.source:
        try:
            sha = source_sha256(vqgan.source)
        except OSError:
            sha = None
    for warning in check_codec_pairing(spec, vqgan.model, prior_name=prior.name, codec_name=vqgan.name,
                                       codec_sha256=sha, who="SundaeSampler"):
        logger.warning(warning)


def _codec_spec(prior: PriorHandle) -> CodecSpec | None:
    meta = dict(getattr(prior.model, "metadata", None) or {})
    if prior.codec:
        meta["sundae.codec"] = prior.codec
    try:
        return CodecSpec.from_metadata(meta)
    except ValueError as exc:
        logger.warning("SundaeSampler: prior %r has unreadable codec metadata (%s); not checking the VQ-GAN",
                       prior.name, exc)
        return None


def _check_tokens_fit_prior(tokens: TokenBatch, prior: PriorHandle) -> None:
    check_tokens(tokens.tokens, prior.codebook_size, "SundaeSampler", owner=f"prior {prior.name!r}",
                 hint="encode the image with the VQ-GAN the prior was trained on"
                 f"{f' ({prior.codec})' if prior.codec else ''}")
    if prior.factor is not None and tokens.factor != prior.factor:
        raise ValueError(
            f"SundaeSampler: the input tokens come from a factor-{tokens.factor} codec but prior "
            f"{prior.name!r} was trained on a factor-{prior.factor} codec ({prior.codec}) — encode with that one"
        )


def _grid_for_size(prior: PriorHandle, vqgan: CodecHandle | None, width: int, height: int):
    """Token grid for a requested pixel size (0 = the prior's trained size), and the factor."""
    factor = vqgan.factor if vqgan is not None else prior.factor
    trained = tuple(int(g) for g in prior.model.config.grid)
    if (width or height) and factor is None:
        raise ValueError(
            f"SundaeSampler: width/height are in pixels, but the codec factor of prior {prior.name!r} "
            "is unknown — connect the VQ-GAN to the sampler's 'vqgan' input, connect tokens, or set "
            "width and height to 0 for the prior's trained size"
        )
    h = max(1, int(height / factor + 0.5)) if height else trained[0]  # nearest, halves up
    w = max(1, int(width / factor + 0.5)) if width else trained[1]
    if factor is not None:
        logger.info("SundaeSampler: generating %dx%d px (%dx%d tokens, factor %d)", w * factor, h * factor, w, h, factor)
    else:
        logger.info("SundaeSampler: generating %dx%d tokens (the prior's trained grid)", w, h)
    return (h, w), factor


class _Progress:
    """The sampler callback: interrupt check every step, progress bar, throttled previews.

    A preview decodes a downscaled view (every k-th token of the first sample, k chosen so the
    image is about ``PREVIEW_MAX_SIZE`` pixels per side); when one costs more than
    ``PREVIEW_BUDGET`` of the step time measured between callbacks, k doubles, and previews are
    spaced so that on average they cost at most that share of the run. An out-of-memory error in
    a preview turns previews off for the run; sampling goes on."""

    def __init__(self, steps: int, vqgan: CodecHandle | None, out: TokenBatch):
        self.bar = comfy.progress_bar(steps)
        self.vqgan, self.out = vqgan, out
        self.next_preview: float | None = None  # no preview before this clock time
        self.coarsen = 1  # extra token stride after previews that cost too much
        self.previews_on = vqgan is not None
        self.step, self.total = 0, steps
        self.last_end = clock()

    def __call__(self, step: int, total: int, tokens: torch.Tensor) -> None:
        comfy.throw_if_interrupted()  # Cancel stops within one step (and inside one: sample's check)
        self.step, self.total = step, total
        preview = None
        now = clock()
        step_time = now - self.last_end
        if self.previews_on and (self.next_preview is None or now >= self.next_preview):
            preview = self._preview(tokens)
            done = clock()
            cost = done - now
            if cost > PREVIEW_BUDGET * step_time:
                self.coarsen *= 2
            self.next_preview = done + max(PREVIEW_INTERVAL_S, cost / PREVIEW_BUDGET)
        self.bar.update_absolute(step, total, preview)
        self.last_end = clock()

    def _preview(self, tokens: torch.Tensor):
        try:
            return self._decode_preview(tokens)
        except (RuntimeError, *comfy.oom_exceptions()) as exc:
            if not comfy.is_out_of_memory(exc):
                raise
            self.previews_on = False
            comfy.soft_empty_cache()
            logger.warning("SundaeSampler: out of memory while decoding a live preview (%s); previews are "
                           "off for this run, sampling goes on", (str(exc).splitlines() or [""])[0][:200])
            return None

    def _decode_preview(self, tokens: torch.Tensor):
        vqgan = self.vqgan
        height, width = self.out.image_size or vqgan.model.image_size(*self.out.grid)
        k = max(1, -(-max(height, width) // PREVIEW_MAX_SIZE)) * self.coarsen
        t = tokens[:1]
        if k > 1:  # every k-th token of the image grid (a pixel codec interleaves channels in w)
            c = vqgan.model.config.channels if isinstance(vqgan.model, sundae_lib.PixelCodec) else 1
            t = rearrange(rearrange(t, "b h (w c) -> b h w c", c=c)[:, ::k, ::k], "b h w c -> b h (w c)")
        x = vqgan.model.decode(t.to(vqgan.device))
        image = codec_to_image(x, (-(-height // k), -(-width // k)), device=torch.device("cpu"))[0]
        return ("JPEG", image_to_pil(image), PREVIEW_MAX_SIZE)

    def finish(self) -> None:
        self.bar.update_absolute(self.total, self.total, None)
