"""The SUNDAE training objective: token corruption and the step-unrolled denoising loss.

SUNDAE (Savinov et al. 2022; McKinney & Willcocks 2022 for VQ-GAN tokens) trains a
non-autoregressive prior ``p(x | x_tilde)`` to map a corrupted token grid back to the clean one:

1. corruption ``q(z0 | z)``: per sample a rate ``t ~ U(0, 1)``; every token is independently
   replaced, with probability ``t``, by a token drawn uniformly from the whole vocabulary (it may
   draw the original token back, so the expected fraction that actually changes is
   ``t * (1 - 1/k)``);
2. unroll: the corrupted grid goes through the prior; the next input is a *sample* from the
   logits at temperature 1 (not the argmax), taken without gradient; repeat ``unroll_steps``
   times. The unroll teaches the model to fix its own mistakes, which is what lets the sampler
   iterate from pure noise;
3. loss: the mean token cross-entropy of every unroll step against the **clean** tokens, all
   steps weighted equally.

Region corruption (an addition for inpainting, off by default): with probability
``region_corruption`` a sample is corrupted only inside a random rectangle (or, half of the
time, only outside it), at its rate ``t``, and through the unroll its tokens outside that region
stay clean, exactly as the inpainting sampler keeps the unmasked tokens. Plain SUNDAE corruption
is spatially uniform, so the prior learns to judge the noise level from the whole grid; when
inpainting, half the grid is clean and the other half pure noise, and a prior that never saw that
trusts too many noise tokens in the hole (on MNIST pixels: bright blobs under the kept half).

Shapes: ``b`` batch, ``h, w`` token grid, ``k`` codebook size. Tokens are int64 ``[b, h, w]``,
labels int64 ``[b]`` with ``-1`` = the null class (unconditional).

``sample_categorical`` and ``uniform`` are shared with the sampler (``sampler.py``): categorical
sampling by inverse CDF with one generator-drawn uniform per position, which is several times
faster on CPU than ``torch.multinomial`` or Gumbel-max at k = 8192 (timing in ``sampler.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "corrupt_tokens",
    "prior_device",
    "random_regions",
    "random_tokens",
    "sample_categorical",
    "sundae_loss",
    "uniform",
]


# --------------------------------------------------------------------------------------------
# randomness helpers (shared with the sampler)
# --------------------------------------------------------------------------------------------


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    return (a.index or 0) == (b.index or 0)


def uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform floats in ``[0, 1)`` of ``shape`` on ``device``, drawn from ``generator``.

    A generator on another device (typically a CPU generator with a model on a GPU) is allowed:
    the numbers are drawn where the generator lives and copied over (non-blocking), so a seed
    gives the same random stream on every device. ``generator=None`` uses torch's global RNG."""
    if generator is None or same_device(generator.device, device):
        return torch.rand(shape, generator=generator, device=device)
    draw = torch.rand(shape, generator=generator, device=generator.device)
    return draw.to(device, non_blocking=True)


def random_tokens(
    shape: tuple[int, ...],
    codebook_size: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Tokens uniform over ``[0, codebook_size)``, int64 ``shape``: ``floor(u * k)`` with ``u``
    from ``uniform`` (so a CPU generator gives the same tokens on every device)."""
    noise = (uniform(shape, generator, device) * codebook_size).long()
    # u < 1 so floor(u * k) < k; the clamp guards against float rounding for very large k
    return noise.clamp_(max=codebook_size - 1)


def sample_categorical(
    logits: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Draw one index per position from ``Categorical(softmax(logits / temperature))``.

    logits: ``[..., k]`` float (any float dtype; the maths runs in float32).
    Returns int64 ``[...]`` on the logits' device.

    Inverse-CDF sampling: ``exp((logits - max) / T)`` is cumulated along ``k`` and one uniform
    per position (scaled by the row total, so no normalisation pass is needed) is located with
    ``searchsorted``. Only ``prod(...)`` random numbers are drawn instead of ``prod(...) * k``
    for Gumbel-max. ``inplace=True`` reuses the logits' storage (the caller must own it and not
    need it afterwards; the sampler does this to save memory and time — never on logits that
    autograd still needs)."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(
            f"sample_categorical: temperature must be a finite number > 0, got {temperature!r}"
        )
    k = logits.shape[-1]
    lead = logits.shape[:-1]
    if logits.dtype != torch.float32:
        x = logits.float()  # a fresh fp32 copy: safe to modify
    elif inplace:
        x = logits
    else:
        x = logits.clone()
    x = x.reshape(-1, k)
    # (logits - max) / T, exponentiated: the unnormalised softmax, largest entry exactly 1
    x.sub_(x.amax(dim=-1, keepdim=True))
    if temperature != 1.0:
        x.div_(temperature)
    cdf = x.exp_().cumsum_(dim=-1)
    u = uniform((cdf.shape[0], 1), generator, cdf.device) * cdf[:, -1:]
    # right=True: the first index whose cumulative mass exceeds u, so a zero-probability entry
    # is never chosen (its cdf equals its predecessor's). The clamp only matters when rounding
    # makes u equal the total (probability ~2^-24).
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=k - 1)
    return idx.reshape(lead)


# --------------------------------------------------------------------------------------------
# corruption
# --------------------------------------------------------------------------------------------


def corrupt_tokens(
    tokens: torch.Tensor,
    rate: torch.Tensor | float,
    codebook_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SUNDAE's corruption ``q(z0 | z)``: each token is independently replaced, with probability
    ``rate`` (per sample), by a token uniform over the whole vocabulary ``[0, codebook_size)``.

    tokens: int ``[b, ...]`` (e.g. ``[b, h, w]``). rate: float ``[b]`` in ``[0, 1]`` or a single
    number for every sample. The replacement may equal the original token, so the expected
    fraction of tokens that actually change is ``rate * (1 - 1 / codebook_size)``.
    Returns a new int64 tensor of the same shape; all randomness comes from ``generator`` (torch's
    global RNG when None)."""
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.dtype == torch.bool
        or tokens.is_floating_point()
        or tokens.is_complex()
    ):
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(
            f"corrupt_tokens: tokens must be an integer tensor [b, ...] (int64 codebook indices), "
            f"got {got}; encode images with the codec first"
        )
    if tokens.dim() < 1:
        raise ValueError("corrupt_tokens: tokens must have a batch axis, got a 0-d tensor")
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(
            f"corrupt_tokens: codebook_size must be a positive int, got {codebook_size!r}"
        )
    b = tokens.shape[0]
    device = tokens.device
    if isinstance(rate, torch.Tensor):
        if rate.dim() == 0:
            rate = rate.reshape(1).expand(b)
        if rate.dim() != 1 or rate.shape[0] != b:
            raise ValueError(
                f"corrupt_tokens: rate must be a float tensor [b] with b = {b} (one rate per "
                f"sample) or a single number, got shape {tuple(rate.shape)}"
            )
        rate = rate.to(device=device, dtype=torch.float32)
    else:
        rate_f = float(rate)
        if not 0.0 <= rate_f <= 1.0:
            raise ValueError(f"corrupt_tokens: rate must lie in [0, 1], got {rate!r}")
        rate = torch.full((b,), rate_f, device=device)
    tokens = tokens.long()
    shape = tuple(tokens.shape)
    rate = rate.reshape((b,) + (1,) * (tokens.dim() - 1))
    replace = uniform(shape, generator, device) < rate
    noise = random_tokens(shape, codebook_size, generator, device)
    return torch.where(replace, noise, tokens)


def random_regions(
    batch: int, grid: tuple[int, int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Random inpainting-style regions: bool ``[batch, h, w]``, True = inside.

    Each region is an axis-aligned rectangle whose height and width are uniform over ``1..h`` /
    ``1..w`` and whose position is uniform among those that fit; with probability 1/2 it is
    replaced by its complement (outpainting). So halves, bands, boxes and frames all occur. All
    randomness from ``generator``."""
    h, w = grid
    u = uniform((batch, 5), generator, device)
    rh = (u[:, 0] * h).long().clamp_(max=h - 1) + 1  # 1..h
    rw = (u[:, 1] * w).long().clamp_(max=w - 1) + 1
    top = (u[:, 2] * (h - rh + 1)).long().clamp_(max=h - rh)
    left = (u[:, 3] * (w - rw + 1)).long().clamp_(max=w - rw)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + rh).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + rw).view(-1, 1, 1))
    )
    flip = (u[:, 4] < 0.5).view(-1, 1, 1)
    region = inside ^ flip
    # a complement of a full-grid rectangle is empty: use the rectangle itself there
    empty = ~region.flatten(1).any(dim=1)
    return torch.where(empty.view(-1, 1, 1), inside, region)


# --------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------


def unwrap_prior(prior: torch.nn.Module) -> torch.nn.Module:
    """The prior behind DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers, for
    reading its attributes (``codebook_size``, ``config``...). Forwards still go through the
    wrapper, so DDP gradient sync and compiled graphs are used."""
    while True:
        inner = getattr(prior, "_orig_mod", None)
        if inner is None and isinstance(prior, torch.nn.parallel.DistributedDataParallel):
            inner = prior.module
        if inner is None:
            return prior
        prior = inner


def prior_device(prior: torch.nn.Module) -> torch.device:
    for p in prior.parameters():
        return p.device
    for buf in prior.buffers():
        return buf.device
    return torch.device("cpu")


def _check_tokens(tokens: torch.Tensor, k: int, where: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(
            f"{where}: tokens must be an int64 tensor [b, h, w], got {type(tokens).__name__}"
        )
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(
            f"{where}: tokens must be integer codebook indices (int64 [b, h, w]), got dtype "
            f"{tokens.dtype}; encode images with the codec first, or cast with .long()"
        )
    if tokens.dim() != 3 or tokens.numel() == 0:
        raise ValueError(
            f"{where}: tokens must have shape [b, h, w] with b, h, w >= 1, got "
            f"{tuple(tokens.shape)}"
        )
    tokens = tokens.long()
    # one host sync; catches a codec / prior codebook mismatch with a readable message instead
    # of an indexing error (or a device-side assert on GPU)
    lo, hi = tokens.aminmax()
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= k:
        raise ValueError(
            f"{where}: token values must lie in [0, {k}) (the prior's codebook size), got range "
            f"[{lo}, {hi}]; use the codec / VQ-GAN this prior was trained on"
        )
    return tokens


def resolve_labels(
    prior: torch.nn.Module,
    labels: int | list[int] | tuple[int, ...] | torch.Tensor | None,
    batch: int,
    device: torch.device,
    where: str,
) -> torch.Tensor | None:
    """Validate ``labels`` against the prior and return int64 ``[batch]`` on ``device`` (``-1``
    = null class) for a conditional prior, or ``None`` for an unconditional one.

    Accepts None, an int (same class for the whole batch), a list / tuple or a tensor of ``batch``
    entries (or of one entry, broadcast). On a conditional prior ``None`` means the null class;
    on an unconditional prior only None or all ``-1`` are accepted."""
    prior = unwrap_prior(prior)
    num_classes = int(prior.num_classes)
    has_null = bool(prior.has_null_class) if num_classes > 0 else False
    if labels is None:
        if num_classes == 0:
            return None
        if not has_null:
            raise ValueError(
                f"{where}: this prior is class-conditional ({num_classes} classes) without a null "
                f"class, so it needs labels: pass labels=0..{num_classes - 1}"
            )
        return torch.full((batch,), -1, dtype=torch.long, device=device)
    if isinstance(labels, bool):
        raise ValueError(f"{where}: labels must be int(s), got a bool {labels!r}")
    if isinstance(labels, int):
        t = torch.full((batch,), labels, dtype=torch.long)
    elif isinstance(labels, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ValueError(f"{where}: labels must be a list of ints, got {labels!r}")
        t = torch.tensor(list(labels), dtype=torch.long)
    elif isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(
                f"{where}: labels must be an integer tensor [b], got dtype {labels.dtype}"
            )
        t = labels.reshape(-1) if labels.dim() <= 1 else labels
    else:
        raise ValueError(
            f"{where}: labels must be None, an int, a list of ints or an int tensor [b], got "
            f"{type(labels).__name__}"
        )
    if t.dim() != 1 or t.shape[0] not in (1, batch):
        raise ValueError(
            f"{where}: labels must have {batch} entries (one per sample) or 1 (for all), got "
            f"shape {tuple(t.shape)}"
        )
    t = t.to(device=device, dtype=torch.long).expand(batch).clone()
    lo, hi = (int(v) for v in t.aminmax())
    if num_classes == 0:
        if lo == hi == -1:
            return None
        raise ValueError(
            f"{where}: this prior is unconditional (num_classes = 0) but got class labels in "
            f"[{lo}, {hi}]; pass labels=None (or -1), or load a class-conditional prior"
        )
    low_ok = -1 if has_null else 0
    if lo < low_ok or hi >= num_classes:
        allowed = (
            f"-1 (null / unconditional) or 0..{num_classes - 1}"
            if has_null
            else (f"0..{num_classes - 1} (this prior has no null class, so -1 is not allowed)")
        )
        raise ValueError(f"{where}: labels must be {allowed}, got values in [{lo}, {hi}]")
    return t


def sundae_loss(
    prior: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor | int | list[int] | None = None,
    *,
    unroll_steps: int = 2,
    class_dropout: float | None = None,
    region_corruption: float = 0.0,
    generator: torch.Generator | None = None,
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SUNDAE step-unrolled denoising loss (a scalar to ``backward()``).

    prior: a ``SundaePrior`` (``prior(tokens [b, h, w], labels [b] | None) -> logits [b, h, w,
    k]``); tokens: clean int64 ``[b, h, w]`` on the prior's device; labels: int64 ``[b]`` class
    ids (``-1`` = null) for a conditional prior, None for an unconditional one (None on a
    conditional prior = all null).

    Per sample a corruption rate ``t ~ U(0, 1)``; ``unroll_steps`` forward passes, each next
    input sampled from the previous logits at temperature 1 without gradient; the result is the
    mean cross-entropy over all steps and tokens against the clean tokens (steps weighted
    equally). ``class_dropout``: probability of replacing each label by the null class (``-1``);
    None = ``prior.config.class_dropout`` for a conditional prior with a null class, else 0.
    ``region_corruption``: probability that a sample is corrupted only inside a random region
    (``random_regions``), its other tokens kept clean through the unroll (inpainting training;
    0 = plain SUNDAE). Randomness: ``generator`` (torch's global RNG when None). With ``return_metrics=True``
    returns ``(loss, metrics)`` where metrics holds detached tensors: ``accuracy`` (argmax token
    accuracy averaged over steps, 0..1), ``loss_per_step`` ``[unroll_steps]``, ``rate`` (mean
    corruption rate of the batch)."""
    where = "sundae_loss"
    if isinstance(unroll_steps, bool) or not isinstance(unroll_steps, int) or unroll_steps < 1:
        raise ValueError(
            f"{where}: unroll_steps must be an int >= 1 (SUNDAE uses 2 or 3), got {unroll_steps!r}"
        )
    base = unwrap_prior(prior)
    k = int(base.codebook_size)
    tokens = _check_tokens(tokens, k, where)
    device = prior_device(prior)
    if not same_device(tokens.device, device):
        raise ValueError(
            f"{where}: tokens are on {tokens.device} but the prior is on {device}; move the "
            f"batch with tokens.to(device) first"
        )
    b = tokens.shape[0]
    labels_t = resolve_labels(prior, labels, b, device, where)

    num_classes = int(base.num_classes)
    has_null = num_classes > 0 and bool(base.has_null_class)
    if class_dropout is None:
        class_dropout = float(base.config.class_dropout) if has_null else 0.0
    class_dropout = float(class_dropout)
    if not 0.0 <= class_dropout <= 1.0:
        raise ValueError(
            f"{where}: class_dropout must lie in [0, 1] (probability of a null label), got "
            f"{class_dropout!r}"
        )
    if class_dropout > 0 and labels_t is not None:
        if not has_null:
            raise ValueError(
                f"{where}: class_dropout={class_dropout} needs a prior with a null class; build "
                f"the prior with null_class=True or pass class_dropout=0"
            )
        drop = uniform((b,), generator, device) < class_dropout
        labels_t = torch.where(drop, torch.full_like(labels_t, -1), labels_t)

    region_corruption = float(region_corruption)
    if not 0.0 <= region_corruption <= 1.0:
        raise ValueError(
            f"{where}: region_corruption must lie in [0, 1] (probability that a sample is "
            f"corrupted only inside a random region), got {region_corruption!r}"
        )

    # q(z0 | z): one corruption rate per sample
    rate = uniform((b,), generator, device)
    x = corrupt_tokens(tokens, rate, k, generator)
    keep = None  # True = a token held clean (outside a sample's corruption region)
    if region_corruption > 0:
        in_region = random_regions(b, tuple(tokens.shape[1:]), generator, device)
        regional = (uniform((b,), generator, device) < region_corruption).view(b, 1, 1)
        keep = regional & ~in_region
        x = torch.where(keep, tokens, x)

    step_losses = []
    step_acc = []
    for step in range(unroll_steps):
        logits = prior(x, labels_t)
        if logits.shape != (*tokens.shape, k):
            raise ValueError(
                f"{where}: the prior returned logits of shape {tuple(logits.shape)}, expected "
                f"{(*tokens.shape, k)} = [b, h, w, codebook_size]"
            )
        flat = rearrange(logits, "b h w k -> (b h w) k").float()
        step_losses.append(F.cross_entropy(flat, rearrange(tokens, "b h w -> (b h w)")))
        if return_metrics:
            with torch.no_grad():
                step_acc.append((logits.argmax(dim=-1) == tokens).float().mean())
        if step < unroll_steps - 1:
            # the next input is a *sample* at temperature 1, taken without gradient (integer
            # tokens carry no gradient anyway; no_grad also skips recording the sampling ops)
            with torch.no_grad():
                x = sample_categorical(logits.detach(), 1.0, generator)
                if keep is not None:
                    x = torch.where(keep, tokens, x)
    loss = torch.stack(step_losses).mean()
    if not return_metrics:
        return loss
    metrics = {
        "accuracy": torch.stack(step_acc).mean(),
        "loss_per_step": torch.stack(step_losses).detach(),
        "rate": rate.mean(),
    }
    return loss, metrics
