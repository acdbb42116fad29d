"""Noise and categorical draws: the randomness of the SUNDAE objective and sampler.

Everything here draws from an explicit ``torch.Generator`` (torch's global RNG when None), and a
generator on another device than the tensors (typically a CPU generator with a model on a GPU) is
allowed: numbers are drawn where the generator lives and copied over, so a seed gives the same
stream on every device.

- ``uniform``: uniform floats in ``[0, 1)``; ``random_tokens``: tokens uniform over the codebook;
- ``sample_categorical``: one draw per position from ``softmax(logits / T)``, by inverse CDF with
  one uniform per position, several times faster on CPU than ``torch.multinomial`` or Gumbel-max
  at k = 8192 (timing in ``sampler.py``);
- ``corrupt_tokens``: SUNDAE's corruption ``q(z0 | z)``, used by the objective and by the
  sampler's variations (``strength < 1``).

Shapes: ``b`` batch, ``k`` codebook size; tokens int64 ``[b, ...]``.
"""

from __future__ import annotations

import math

import torch

from .checks import check_int

__all__ = [
    "corrupt_tokens",
    "random_tokens",
    "same_device",
    "sample_categorical",
    "uniform",
]


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same (``cuda`` and ``cuda:0`` are)."""
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
    check_int(codebook_size, "corrupt_tokens: codebook_size", minimum=1)
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
