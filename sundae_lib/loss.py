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

The corruption and the categorical draws live in ``noise.py``, shared with the sampler. Inputs
are validated once at the top of ``sundae_loss``; the unroll then calls the prior without its
per-call checks (``prior.forward_unchecked``), so a step costs no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ._helpers import module_device, unwrap
from .checks import check_int, check_number, check_tokens
from .labels import resolve_labels
from .noise import corrupt_tokens, same_device, sample_categorical, uniform
from .prior import forward_unchecked

__all__ = ["random_regions", "resolve_labels", "sundae_loss"]


# --------------------------------------------------------------------------------------------
# region corruption
# --------------------------------------------------------------------------------------------


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
    check_int(unroll_steps, f"{where}: unroll_steps", minimum=1, hint="SUNDAE uses 2 or 3")
    base = unwrap(prior)
    k = int(base.codebook_size)
    tokens = check_tokens(tokens, k, where, hint="use the codec / VQ-GAN this prior was trained on")
    device = module_device(prior)
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
    class_dropout = check_number(class_dropout, f"{where}: class_dropout", low=0, high=1,
                                 hint="it is the probability of replacing a label by the null class")
    if class_dropout > 0 and labels_t is not None:
        if not has_null:
            raise ValueError(
                f"{where}: class_dropout={class_dropout} needs a prior with a null class; build "
                f"the prior with null_class=True or pass class_dropout=0"
            )
        drop = uniform((b,), generator, device) < class_dropout
        labels_t = torch.where(drop, torch.full_like(labels_t, -1), labels_t)

    region_corruption = check_number(
        region_corruption, f"{where}: region_corruption", low=0, high=1,
        hint="it is the probability that a sample is corrupted only inside a random region",
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
        # tokens and labels were validated above (and x is drawn in range): no per-step checks
        logits = forward_unchecked(prior, x, labels_t)
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
