"""The SUNDAE sampler: unconditional, class-conditional, inpainting and variations in one loop.

Starting from uniform random tokens (or from given tokens), every step
1. runs the prior on the samples that are still active (one forward; with classifier-free
   guidance the conditional and the null-class branch share that forward, batched);
2. draws a proposal for every position from ``Categorical(logits / T_n)`` in float32 (even when
   the model runs in bf16 / fp16);
3. lets each position take its proposal with probability ``p_n`` (independent Bernoulli per
   position), otherwise keep its token; positions outside an inpainting mask always keep;
4. early stop: from step index ``min_steps`` on, a sample whose tokens did not change in the
   step is frozen and leaves the batch (the next forwards run only on the active samples, with
   labels, masks and tokens indexed by the active subset — the official code crashed here with
   batch > 1, its bug B8 in docs/official-code.md); the loop ends when every sample is frozen.

``T_n`` and ``p_n`` are linear schedules from start to end over the steps, endpoints included
(see ``schedule``). All randomness comes from one ``torch.Generator``; the same generator state
gives the same tokens. A CPU generator may drive a model on a GPU: the (few) random numbers are
drawn on the CPU and copied, so a seed means the same thing on every device.

Shapes: ``b`` batch, ``h, w`` token grid, ``k`` codebook size. Tokens int64 ``[b, h, w]``; masks
bool ``[b, h, w]`` with True = regenerate; labels int64 ``[b]`` with ``-1`` = null class.

Timing note (categorical draw, CPU, 2 threads, k = 8192, b·h·w = 1024, mean of 10–20 draws, two
runs on a busy shared 2-core machine): ``torch.multinomial(softmax(l / T), 1, generator=g)``
460–700 ms, Gumbel-max with generator-drawn uniforms 430–490 ms, softmax + cumsum +
``searchsorted`` 130–210 ms, and the in-place inverse CDF used here (``exp((l - max) / T)``
cumulated in place, one uniform per position scaled by the row total) 50–105 ms: 4–9× faster
than ``multinomial``; it draws b·h·w random numbers instead of b·h·w·k and needs no
normalisation pass. Whole-step sampler overhead (everything but the forward; 1 thread, same
sizes, p = 1 or 0.5): 27–34 ms CPU per step, about the cost of copying the 32 MiB of logits once
(35 ms in the same run).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

from ._helpers import module_device, unwrap
from .checks import check_int, check_number, check_tokens, is_int, is_number
from .labels import resolve_labels
from .layers import interrupt_check
from .noise import corrupt_tokens, random_tokens, sample_categorical, uniform
from .prior import forward_unchecked
from .prior_metadata import SamplingDefaults

logger = logging.getLogger(__name__)

__all__ = ["sample", "schedule", "schedule_value"]

Callback = Callable[[int, int, torch.Tensor], None]


def schedule(start: float, end: float, steps: int) -> list[float]:
    """Linear schedule from ``start`` to ``end`` over ``steps`` values, both endpoints included
    (``steps == 1`` gives ``[start]``). Computed in float64 Python arithmetic, so the endpoints
    are exact."""
    check_int(steps, "schedule: steps", minimum=1)
    return [schedule_value(start, end, steps, i) for i in range(steps)]


def schedule_value(start: float, end: float, steps: int, i: int) -> float:
    """Value ``i`` (0-based) of :func:`schedule` ``(start, end, steps)``, computed alone with the
    same arithmetic (bit-identical), so a sampler never materialises a ``steps``-long list."""
    if steps == 1:
        return float(start)
    return float(start) + (float(end) - float(start)) * i / (steps - 1)


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """A constant (one number) or a ``(start, end)`` schedule, as two floats."""
    if is_number(value):
        return float(value), float(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if all(is_number(v) for v in value):
            return float(value[0]), float(value[1])
    raise ValueError(
        f"sample: {name} must be a number (constant) or a (start, end) pair of numbers, got "
        f"{value!r}"
    )


def _check_grid(grid: object, source: str) -> tuple[int, int]:
    ok = (
        isinstance(grid, (tuple, list))
        and len(grid) == 2
        and all(is_int(v) and v >= 1 for v in grid)
    )
    if not ok:
        raise ValueError(
            f"sample: grid ({source}) must be two positive ints (h, w) in tokens, got {grid!r}"
        )
    return int(grid[0]), int(grid[1])


def _check_init_tokens(init: object, k: int, device: torch.device) -> torch.Tensor:
    """``init_tokens`` ``[b, h, w]`` or ``[h, w]`` (a batch of one) -> int64 ``[b, h, w]`` on
    ``device``."""
    if isinstance(init, torch.Tensor) and init.dim() == 2:
        init = init.unsqueeze(0)
    init = check_tokens(init, k, "sample", name="init_tokens",
                        hint="encode with the VQ-GAN this prior was trained on")
    return init.to(device)


def can_guide_classes(prior: torch.nn.Module) -> bool:
    """Whether classifier-free guidance can act on this prior at all: class-conditional with a
    null class (it also needs a label that is not the null class). A *recorded* cfg_scale is
    skipped where it cannot act; the Sampler node asks the same question for its log."""
    base = unwrap(prior)
    return int(base.num_classes) > 0 and bool(base.has_null_class)


def _check_mask(mask: object, b: int, h: int, w: int, device: torch.device,
                b0: int | None = None) -> torch.Tensor:
    """A regenerate-mask ``[m, h, w]`` or ``[h, w]`` -> bool ``[b, h, w]`` on ``device``: the one
    place a mask is broadcast to the sample batch. ``m`` is ``b``, or divides the init batch
    ``b0`` (so every mask serves whole init grids: mask ``i`` covers grids
    ``i*b0/m .. (i+1)*b0/m - 1`` and all their samples)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"sample: mask must be a bool tensor [b, h, w] (True = regenerate), got "
            f"{type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"sample: mask must be bool (True = regenerate) or hold only 0 / 1, got dtype "
                f"{mask.dtype} with other values; threshold it first (mask > 0.5)"
            )
        mask = mask != 0
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    b0 = b if b0 is None else b0
    m = mask.shape[0] if mask.dim() == 3 else 0
    if mask.dim() != 3 or tuple(mask.shape[1:]) != (h, w) or m == 0 or (m != b and b0 % m):
        raise ValueError(
            f"sample: mask shape {tuple(mask.shape)} does not match the tokens [{b}, {h}, {w}] "
            f"({b0} init grids); allowed: [{b}, {h}, {w}] (one per sample), [m, {h}, {w}] with m "
            f"dividing {b0} (each mask serves {b0}/m consecutive init grids and their samples), "
            f"[1, {h}, {w}] or [{h}, {w}] (one mask for all). Convert pixel masks to the token "
            f"grid first (masks.token_mask_from_pixels)"
        )
    return _spread(mask.to(device), b)


def _spread(t: torch.Tensor, b: int) -> torch.Tensor:
    """``[m, ...]`` with ``m`` dividing ``b`` -> ``[b, ...]``: item ``i`` serves samples
    ``i*b/m .. (i+1)*b/m - 1`` (a view for ``m == 1``)."""
    m = t.shape[0]
    if m == b:
        return t
    return t.expand(b, *t.shape[1:]) if m == 1 else t.repeat_interleave(b // m, dim=0)


def _set_eval(prior: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    modes = [(m, m.training) for m in prior.modules()]
    prior.eval()
    return modes


def _restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _guided_logits(
    prior: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor | None,
    cfg_scale: float,
    k: int,
) -> torch.Tensor:
    """Float32 logits ``[n, h, w, k]``; with guidance (``cfg_scale != 1``) the conditional and the
    null-class branch run in one batched forward and mix as ``u + s * (c - u)``."""
    # inputs were validated once before the loop: no per-call range checks (host syncs)
    if cfg_scale == 1.0:
        out = forward_unchecked(prior, tokens, labels)
    else:
        both = torch.cat([tokens, tokens])
        null = torch.full_like(labels, -1)
        out = forward_unchecked(prior, both, torch.cat([labels, null]))
    expected = (tokens.shape[0] * (1 if cfg_scale == 1.0 else 2), *tokens.shape[1:], k)
    if tuple(out.shape) != expected:
        raise ValueError(
            f"sample: the prior returned logits of shape {tuple(out.shape)}, expected "
            f"{expected} = [b, h, w, codebook_size]"
        )
    out = out.float()  # sampling maths in fp32 even for a bf16 / fp16 model
    if cfg_scale == 1.0:
        return out
    cond, uncond = out.chunk(2)
    # in place on tensors we own (inference mode): cond <- uncond + s * (cond - uncond)
    return cond.sub_(uncond).mul_(cfg_scale).add_(uncond)


def sample(
    prior: torch.nn.Module,
    *,
    batch_size: int = 1,
    grid: tuple[int, int] | None = None,
    steps: int | None = None,
    temperature: float | tuple[float, float] | None = None,
    update_proportion: float | tuple[float, float] | None = None,
    early_stop: bool | None = None,
    min_steps: int | None = None,
    labels: int | str | Sequence[int | str] | torch.Tensor | None = None,
    cfg_scale: float | None = None,
    init_tokens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    strength: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample token grids from a SUNDAE prior. Returns int64 ``[b, h, w]`` on the prior's device.

    Settings not given come from the prior: ``steps``, ``temperature``, ``update_proportion``,
    ``early_stop``, ``min_steps`` and ``cfg_scale`` left at None take the value the prior's file
    records (``sundae.sampling``, written by the trainer or ``sundae-train record-sampling``:
    ``SamplingDefaults.from_prior(prior)``); a setting the file does not record (or a prior
    without a file) takes the library default of :class:`~.prior_metadata.SamplingDefaults`:
    100 steps, temperature 1.0 -> 0.7, update proportion 1.0, early stop after ``min_steps`` 10,
    cfg 1. Precedence: an explicit argument always wins, then the file, then the library
    default. A *recorded* guidance scale is not applied where guidance cannot act (an
    unconditional prior, one without a null class, or every label the null class: the mix would
    equal the null branch); an explicit ``cfg_scale`` is always applied as given.

    Modes (one loop):
    - **unconditional / class-conditional**: start from uniform random tokens.
      ``labels``: None, one class (an int id or a name from the prior's label map, e.g.
      ``"Animals & Nature"``), a list of them, or an int tensor ``[b]`` (one entry broadcasts);
      ``-1`` / ``"none"`` = null class (unconditional); None on a conditional prior = all null
      (``labels.resolve_labels``).
    - **inpainting**: ``init_tokens`` ``[b, h, w]`` + ``mask`` bool (True = regenerate). Tokens
      outside the mask never change (bit-identical); masked tokens start from uniform noise; the
      model sees the whole grid. The mask may be ``[b, h, w]``, ``[m, h, w]`` with ``m`` dividing
      ``b`` (mask ``i`` serves the samples of init grid ``i``), ``[1, h, w]`` or ``[h, w]``; a
      0/1 integer or float mask is accepted too. An all-False mask returns ``init_tokens``
      (repeated to the batch) without running the model and without callbacks: the one
      empty-mask shortcut of the pack (the path from a pixel mask to here: ``masks``).
    - **variations**: ``strength < 1`` corrupts that fraction of ``init_tokens`` (each token
      replaced by a uniform random token with probability ``strength`` — the training
      corruption — inside the mask if one is given) and runs ``max(1, round(steps * strength))``
      steps: the *last* steps of the ``steps``-long schedules, as if the earlier ones had already
      happened. ``strength = 1`` with ``init_tokens`` and no mask starts from pure noise (the
      tokens then only fix the grid and batch size).

    Batch and grid rules: the grid comes from ``init_tokens`` if given (``grid``, if also given,
    must equal it), else from ``grid``, else ``prior.config.grid``; any grid works. With
    ``init_tokens`` of batch ``B``: ``batch_size`` 1 (the default) gives one sample per grid;
    a multiple ``n * B`` gives ``n`` consecutive samples of each grid (so tokens of batch 1 with
    ``batch_size = n`` are n inpaintings / variations of one image). Masks follow the same rule.

    Schedules: ``temperature`` ``T`` and ``update_proportion`` ``p`` are a number (constant) or
    ``(start, end)``, linear over ``steps`` with both endpoints included (``steps = 1`` uses the
    start values). Each step a position takes its proposal with probability ``p``.

    Early stop (``early_stop=True``): at step index ``i >= min_steps`` (0-based; so at least
    ``min_steps`` steps always run) a sample whose tokens did not change is frozen and leaves
    the batch; the loop ends when all are frozen. This check is the only host synchronisation
    per step.

    Guidance: ``cfg_scale != 1`` mixes conditional and null-class logits, ``u + s * (c - u)``,
    both from one batched forward; it needs a prior with a null class. ``cfg_scale == 1`` is
    exactly the unguided path.

    ``generator``: all randomness (create one with a seed for reproducible results; None draws
    a seed from torch's global RNG). ``callback(step, total, tokens)`` is called after every
    executed step with ``step`` = steps done (1-based), ``total`` = planned steps and the whole
    current batch (frozen samples included; an inference tensor — read it or ``.clone()`` it,
    do not modify it). An exception raised in the callback propagates and stops sampling
    (cancel). With early stop the last call may have ``step < total``.
    ``check_interrupt()``: installed (``layers.interrupt_check``) for the duration of the call,
    so the prior calls it between transformer blocks and hourglass levels *inside* each forward;
    an exception it raises cancels mid-step (a step of a large grid can take minutes on a CPU).

    The prior runs in eval mode under ``torch.inference_mode()`` (its train/eval modes are
    restored afterwards) in its own dtype; logits are cast to float32 for sampling. The result
    is a normal (non-inference) tensor.
    """
    # ---------------- settings: explicit, else the prior's record, else the library's ----------
    recorded = SamplingDefaults.from_prior(prior)
    steps = recorded.steps if steps is None else steps
    temperature = recorded.temperature if temperature is None else temperature
    update_proportion = recorded.update_proportion if update_proportion is None else update_proportion
    early_stop = recorded.early_stop if early_stop is None else early_stop
    min_steps = recorded.min_steps if min_steps is None else min_steps
    cfg_recorded = cfg_scale is None
    cfg_scale = recorded.cfg_scale if cfg_scale is None else cfg_scale

    # ---------------- scalar settings ----------------
    steps = check_int(steps, "sample: steps", minimum=1, hint="use e.g. steps=100")
    min_steps = check_int(min_steps, "sample: min_steps", minimum=0, hint="use e.g. min_steps=10")
    batch_size = check_int(batch_size, "sample: batch_size", minimum=1,
                           hint="the number of images to sample")
    t_start, t_end = _pair(temperature, "temperature")
    for t in (t_start, t_end):
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(
                f"sample: temperature must be > 0 and finite, got {temperature!r}; lower = "
                f"sharper (e.g. 0.7), 1 = the model's distribution"
            )
    p_start, p_end = _pair(update_proportion, "update_proportion")
    for p in (p_start, p_end):
        if not 0.0 < p <= 1.0:
            raise ValueError(
                f"sample: update_proportion must lie in (0, 1] (fraction of positions updated "
                f"per step), got {update_proportion!r}"
            )
    cfg_scale = check_number(cfg_scale, "sample: cfg_scale", low=0,
                             hint="1 = no guidance, > 1 = stronger class adherence")
    strength = check_number(strength, "sample: strength", low=0, high=1, low_open=True,
                            hint="the fraction of init_tokens re-drawn; 1 = start from noise")
    if callback is not None and not callable(callback):
        raise ValueError(
            f"sample: callback must be callable(step, total, tokens), got {callback!r}"
        )
    if check_interrupt is not None and not callable(check_interrupt):
        raise ValueError(f"sample: check_interrupt must be callable() or None, got {check_interrupt!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"sample: generator must be a torch.Generator, got {type(generator).__name__}; use "
            f"torch.Generator().manual_seed(seed)"
        )

    base = unwrap(prior)  # attributes; forwards go through ``prior`` itself
    k = int(base.codebook_size)
    device = module_device(prior)

    # ---------------- tokens, grid, batch ----------------
    init: torch.Tensor | None = None
    if init_tokens is None:
        if mask is not None:
            raise ValueError(
                "sample: a mask needs init_tokens (the tokens to keep outside the mask); pass "
                "init_tokens=<encoded image tokens> or drop the mask"
            )
        if strength < 1.0:
            raise ValueError(
                f"sample: strength={strength} makes variations of init_tokens, but none were "
                f"given; pass init_tokens or use strength=1"
            )
        source = "argument" if grid is not None else "prior.config.grid"
        h, w = _check_grid(grid if grid is not None else base.config.grid, source)
        b = batch_size
    else:
        init = _check_init_tokens(init_tokens, k, device)
        b0, h, w = init.shape
        if grid is not None and _check_grid(grid, "argument") != (h, w):
            raise ValueError(
                f"sample: grid={tuple(grid)} differs from the init_tokens grid {(h, w)}; drop the "
                f"grid argument (it follows init_tokens)"
            )
        b = b0 if batch_size == 1 else batch_size
        if b % b0:
            raise ValueError(
                f"sample: batch_size={batch_size} does not match init_tokens batch {b0}; use "
                f"batch_size=1 (one sample per token grid) or a multiple of {b0} (n samples of "
                f"each grid, consecutive)"
            )
        init = _spread(init, b)

    labels_t = resolve_labels(prior, labels, b, device, "sample")
    num_classes = int(base.num_classes)
    can_guide = can_guide_classes(base)
    if cfg_recorded and cfg_scale != 1.0 and (not can_guide or bool((labels_t < 0).all())):
        # the file's guidance scale has nothing to act on (no classes, no null class, or only
        # null labels: u + s * (u - u) = u); skip the second branch instead of refusing / wasting it
        logger.debug("sample: the recorded cfg_scale %g does not apply here; sampling unguided", cfg_scale)
        cfg_scale = 1.0
    if cfg_scale != 1.0 and not can_guide:
        raise ValueError(
            f"sample: cfg_scale={cfg_scale} needs a class-conditional prior with a null class "
            f"(trained with class dropout); this prior has num_classes={num_classes}"
            f"{'' if num_classes == 0 else ' and no null class'}. Use cfg_scale=1, or a prior "
            f"trained with class dropout"
        )

    regen: torch.Tensor | None = None  # None = regenerate everywhere
    if mask is not None:
        assert init is not None
        regen = _check_mask(mask, b, h, w, device, b0)
        if not bool(regen.any()):
            logger.info("sample: the mask is empty, nothing to regenerate: returning init_tokens")
            return init.clone()

    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))

    # variations run the last n_run steps of the steps-long schedules; values are computed per
    # step (a 10**8-step request must not build 10**8-element lists before step 1)
    n_run = steps if strength == 1.0 else max(1, round(steps * strength))
    offset = steps - n_run

    def temps(i: int) -> float:
        return schedule_value(t_start, t_end, steps, offset + i)

    def props(i: int) -> float:
        return schedule_value(p_start, p_end, steps, offset + i)

    modes = _set_eval(prior)
    try:
        with torch.inference_mode(), interrupt_check(check_interrupt):
            x = _sample_loop(
                prior, shape=(b, h, w), k=k, device=device, init=init, regen=regen,
                strength=strength, labels=labels_t, cfg_scale=cfg_scale, total=n_run,
                temps=temps, props=props, min_steps=min_steps if early_stop else None,
                generator=generator, callback=callback,
            )
    finally:
        _restore_modes(modes)
    return x.clone()  # a normal tensor, usable (and writable) outside inference mode


def _sample_loop(
    prior: torch.nn.Module,
    *,
    shape: tuple[int, int, int],
    k: int,
    device: torch.device,
    init: torch.Tensor | None,
    regen: torch.Tensor | None,
    strength: float,
    labels: torch.Tensor | None,
    cfg_scale: float,
    total: int,
    temps: Callable[[int], float],
    props: Callable[[int], float],
    min_steps: int | None,
    generator: torch.Generator,
    callback: Callback | None,
) -> torch.Tensor:
    """The step loop of ``sample`` (inputs already validated): ``total`` steps, ``temps(i)`` and
    ``props(i)`` the temperature and update proportion of step ``i`` (0-based).
    ``min_steps=None`` disables early stopping. Returns int64 ``shape`` = ``[b, h, w]``."""
    b = shape[0]
    # ---------------- start state ----------------
    if init is None or (strength == 1.0 and regen is None):
        x = random_tokens(shape, k, generator, device)
    elif strength == 1.0:
        x = torch.where(regen, random_tokens(shape, k, generator, device), init)
    else:
        corrupted = corrupt_tokens(init, strength, k, generator)
        x = corrupted if regen is None else torch.where(regen, corrupted, init)

    active: torch.Tensor | None = None  # indices of unfrozen samples; None = all of them
    for i in range(total):
        if active is None:
            xa, la, ra = x, labels, regen
        else:
            xa = x.index_select(0, active)
            la = None if labels is None else labels.index_select(0, active)
            ra = None if regen is None else regen.index_select(0, active)
        logits = _guided_logits(prior, xa, la, cfg_scale, k)
        proposal = sample_categorical(logits, temps(i), generator, inplace=True)
        del logits
        update = ra
        p_i = props(i)
        if p_i < 1.0:
            keep_draw = uniform(tuple(xa.shape), generator, device) < p_i
            update = keep_draw if ra is None else keep_draw & ra
        new = proposal if update is None else torch.where(update, proposal, xa)

        changed = None
        if min_steps is not None and i >= min_steps:
            changed = (new != xa).flatten(1).any(dim=1)
            if bool(changed.all()):  # the one host sync per step
                changed = None
        x = new if active is None else x.index_copy(0, active, new)
        if changed is not None:
            idx = torch.arange(b, device=device) if active is None else active
            active = idx[changed]
            logger.debug("sample: step %d froze samples, %d still active", i + 1, active.numel())
        if callback is not None:
            callback(i + 1, total, x)
        if active is not None and active.numel() == 0:
            logger.debug("sample: all samples converged after %d of %d steps", i + 1, total)
            break
    return x
