"""Input checks shared by the library, the ComfyUI nodes and the CLI: one home per rule.

Every check raises ``ValueError`` whose message names the bad value, says what is allowed and,
where there is one, what to do (the caller passes that as ``hint``). Callers name the value
with its owner, e.g. ``"PriorConfig.dim"`` or ``"sample: steps"``, so a message says where it
came from.

Scalars: ``bool`` is a subclass of ``int`` in Python, so ``True`` would pass a plain
``isinstance(v, int)``; :func:`is_int` and :func:`is_number` exclude it. JSON configs and node
widgets give plain ``int`` / ``float``; numpy scalars are not accepted (convert with ``int()`` /
``float()``).

Token grids: :func:`check_tokens` is the one validator of ``[b, h, w]`` codebook indices, used by
the prior's forward, the objective, the sampler's ``init_tokens``, the codecs' ``decode`` and the
nodes. Its range check is one host synchronisation (``aminmax``).

Only the standard library is imported up front (torch when a token grid is checked), so the
torch-free config modules (``config_dict``, ``vqgan_config``) use these checks too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "check_bool",
    "check_int",
    "check_number",
    "check_tokens",
    "is_int",
    "is_number",
]


# --------------------------------------------------------------------------------------------
# scalars
# --------------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    """True for a Python ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a Python ``int`` or ``float`` that is not a ``bool`` (NaN and inf included:
    :func:`check_number` rejects them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _suffix(value: Any, hint: str | None) -> str:
    return f", got {value!r}" + (f"; {hint}" if hint else "")


def _interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> str:
    """``"[low, high]"``, with ``(`` / ``)`` on an open side."""
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _allowed(
    noun: str,
    low: float | None,
    high: float | None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> str:
    """What a value must be, to follow "must be": ``noun`` with its bounds (``"an integer in
    [2, 8]"``, ``"a number > 1"``, ``"an integer <= 8"``), or ``noun`` alone with none."""
    if low is not None and high is not None:
        return f"{noun} in {_interval(low, high, low_open=low_open, high_open=high_open)}"
    if low is not None:
        return f"{noun} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{noun} {'<' if high_open else '<='} {high}"
    return noun


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    hint: str | None = None,
) -> int:
    """``value`` as an ``int`` (not a ``bool``) with ``minimum <= value <= maximum`` (bounds
    optional, inclusive); otherwise ``ValueError``: "``name`` must be an integer >= minimum, got
    ...; ``hint``"."""
    low_ok = minimum is None or (is_int(value) and value >= minimum)
    high_ok = maximum is None or (is_int(value) and value <= maximum)
    if is_int(value) and low_ok and high_ok:
        return value
    allowed = _allowed("an integer", minimum, maximum)
    raise ValueError(f"{name} must be {allowed}{_suffix(value, hint)}")


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str | None = None,
) -> float:
    """``value`` (an ``int`` or ``float``, not a ``bool``, finite) as a ``float`` within the
    bounds: ``low`` / ``high`` inclusive unless ``low_open`` / ``high_open``. Otherwise
    ``ValueError``: "``name`` must lie in [low, high), got ...; ``hint``" (or "must be a number
    > low" with one bound, "must be a finite number" with none)."""
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return float(value)
    if low is not None and high is not None:
        interval = _interval(low, high, low_open=low_open, high_open=high_open)
        raise ValueError(f"{name} must lie in {interval}{_suffix(value, hint)}")
    noun = "a finite number" if low is None and high is None else "a number"
    allowed = _allowed(noun, low, high, low_open=low_open, high_open=high_open)
    raise ValueError(f"{name} must be {allowed}{_suffix(value, hint)}")


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a ``bool``; otherwise ``ValueError``: "``name`` must be true or
    false"."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# token grids
# --------------------------------------------------------------------------------------------

TOKENS_DTYPE_HINT = (
    "if these are images or latents, encode them with the codec (VQ-GAN Encode) first; cast "
    "integer indices with .long()"
)


def check_tokens(
    tokens: Any,
    codebook_size: int,
    where: str,
    *,
    name: str = "tokens",
    owner: str = "the prior",
    hint: str = "use the codec (VQ-GAN) the prior was trained on",
) -> torch.Tensor:
    """Validate a token grid and return it as int64 (same device; no copy when it already is).

    ``tokens`` must be a tensor ``[b, h, w]`` with every size >= 1, of an integer dtype (not
    bool), with values in ``[0, codebook_size)``. Messages start with ``where`` (e.g.
    ``"SundaePrior"``, ``"sample"``), call the value ``name`` and the model whose codebook sets
    the range ``owner``; ``hint`` says what to do about out-of-range values. The range check
    costs one host synchronisation; callers in a loop validate once and skip it afterwards
    (``SundaePrior.forward(validate=False)``)."""
    import torch

    if not isinstance(tokens, torch.Tensor):
        raise ValueError(
            f"{where}: {name} must be a torch.Tensor [b, h, w] of int64 codebook indices, got "
            f"{type(tokens).__name__}"
        )
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(
            f"{where}: {name} must be integer codebook indices (int64 [b, h, w]), got dtype "
            f"{tokens.dtype}; {TOKENS_DTYPE_HINT}"
        )
    if tokens.ndim != 3:
        add = f" (add a batch axis: {name}[None])" if tokens.ndim == 2 else ""
        raise ValueError(
            f"{where}: {name} must have shape [b, h, w], got {tuple(tokens.shape)}{add}"
        )
    if tokens.numel() == 0:
        raise ValueError(
            f"{where}: {name} shape {tuple(tokens.shape)} is empty; b, h and w must all be >= 1"
        )
    tokens = tokens.long()  # no copy when already int64; aminmax has no uint16 / uint32 kernels
    lo, hi = torch.stack(tokens.aminmax()).tolist()  # one device-to-host copy
    if lo < 0 or hi >= codebook_size:
        raise ValueError(
            f"{where}: token ids span [{lo}, {hi}] but {owner} has {codebook_size} codes: {name} "
            f"must lie in [0, {codebook_size}); {hint}"
        )
    return tokens
