"""Class labels: the one resolver of "which class" for the prior, the loss, the sampler, the
ComfyUI node and the CLI.

A class is given as an int id (``0..num_classes-1``), a numeric string (``"7"``) or a name
from the prior's label map (``"Animals & Nature"``; exact first, then ignoring case and
surrounding spaces). The null class (classifier-free guidance's unconditional branch, trained
with class dropout) is ``-1``, ``"-1"``, ``"none"``, ``"null"`` or an empty string. A name of the
label map wins over an id read from the same string (a map ``["1", "0"]`` means what it says).

:func:`resolve_labels` turns a sampler / loss argument (None, an int or name, a list of them,
or an int tensor ``[b]``) into int64 ``[b]`` with ``-1`` = null; :func:`resolve_class` one
value into an id. Errors name the value and list what the prior accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._helpers import unwrap
from .prior_metadata import PriorMetadata

__all__ = ["NULL_WORDS", "LabelSpace", "resolve_class", "resolve_labels"]

NULL_WORDS = ("-1", "none", "null", "")
_SHOWN = 12  # names listed in an error message


@dataclass(frozen=True)
class LabelSpace:
    """The classes a prior knows: ``num_classes`` (0 = unconditional), whether it has a null
    class, and its class names in id order (``names[i]`` names class ``i``; may be empty)."""

    num_classes: int
    has_null: bool
    names: tuple[str, ...] = ()

    @classmethod
    def of(cls, prior: Any, *, with_names: bool = True) -> LabelSpace:
        """From a prior (or anything with ``num_classes`` / ``has_null_class``; wrappers looked
        through); names from its file's ``sundae.label_map`` when ``with_names``."""
        base = unwrap(prior)
        n = int(base.num_classes)
        names: tuple[str, ...] = ()
        if with_names and n:
            names = (PriorMetadata.of(base).label_map or ())[:n]
        return cls(n, bool(n and base.has_null_class), names)

    # ---- one value ------------------------------------------------------------------------------

    def resolve(self, value: Any, *, where: str = "label") -> int:
        """One class -> its id (``-1`` = the null class). See the module docstring for the forms."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where} {value!r}: give a class id (int), a class name or -1 / 'none' "
                             f"(the null class); {self.allowed()}")
        if isinstance(value, str):
            text = value.strip()
            index = self._by_name(text)
            if index is not None:
                return index
            if text.lower() in NULL_WORDS:
                value = -1
            else:
                try:
                    value = int(text)
                except ValueError:
                    raise ValueError(f"{where} {value!r} is not a class of this prior; {self.allowed()}") from None
        return self.check_id(value, where=where)

    def check_id(self, value: int, *, where: str = "label") -> int:
        if value == -1:
            if not self.num_classes:
                return -1
            if self.has_null:
                return -1
            raise ValueError(f"{where} {value}: this prior has no null class (it was trained without class "
                             f"dropout), so it cannot sample unconditionally; {self.allowed()}")
        if not self.num_classes:
            raise ValueError(f"{where} {value!r}: this prior is unconditional (it has no classes); use -1 / "
                             "'none' or leave the class out")
        if not 0 <= value < self.num_classes:
            raise ValueError(f"{where} {value} is out of range: this prior has {self.num_classes} classes; "
                             f"{self.allowed()}")
        return value

    def _by_name(self, text: str) -> int | None:
        if not self.names:
            return None
        if text in self.names:
            return self.names.index(text)
        folded = [i for i, name in enumerate(self.names) if name.strip().casefold() == text.casefold()]
        return folded[0] if len(folded) == 1 else None

    def allowed(self) -> str:
        """What this prior accepts, for error messages."""
        if not self.num_classes:
            return "this prior is unconditional: use -1 / 'none'"
        ids = f"0..{self.num_classes - 1}"
        null = " or -1 / 'none' (the null class)" if self.has_null else " (no null class)"
        if not self.names:
            return f"use a class id {ids}{null}"
        shown = ", ".join(repr(n) for n in self.names[:_SHOWN])
        more = f", ... ({len(self.names)} in all)" if len(self.names) > _SHOWN else ""
        return f"use a class id {ids} or a name: {shown}{more}{null}"

    def name(self, index: int) -> str:
        """``"Animals & Nature" (2)`` / ``class 2`` / ``the null class``, for logs."""
        if index < 0:
            return "the null class"
        return f"{self.names[index]!r} ({index})" if index < len(self.names) else f"class {index}"


def resolve_class(prior: Any, value: Any, *, where: str = "label") -> int:
    """One class of ``prior`` (an id, a numeric string, a name, or a null word) -> its id,
    ``-1`` for the null class. Raises ``ValueError`` listing the valid ids and names."""
    return LabelSpace.of(prior, with_names=isinstance(value, str)).resolve(value, where=where)


def _is_numpy_int(value: Any) -> bool:
    """A NumPy integer scalar or array (without importing NumPy): dtype kind 'i' or 'u'."""
    return not isinstance(value, torch.Tensor) and getattr(getattr(value, "dtype", None), "kind", None) in ("i", "u")


def _from_numpy(labels: Any) -> Any:
    """NumPy integer labels as the types the resolver takes: an array or scalar -> an int64
    tensor, integer scalars inside a list -> ints (what ``torch.as_tensor`` accepted before)."""
    if _is_numpy_int(labels):
        return torch.as_tensor(labels, dtype=torch.long)
    if isinstance(labels, (list, tuple)) and any(_is_numpy_int(v) for v in labels):
        return [int(v) if _is_numpy_int(v) else v for v in labels]
    return labels


def resolve_labels(
    prior: Any,
    labels: int | str | Sequence[int | str] | torch.Tensor | None,
    batch: int,
    device: torch.device | str | None,
    where: str,
) -> torch.Tensor | None:
    """Validate ``labels`` against the prior: int64 ``[batch]`` on ``device`` with ``-1`` = null
    for a conditional prior, None for an unconditional one.

    Accepts None, one class (int id or name: the whole batch), a list / tuple of ``batch``
    classes (or of one), or an integer tensor ``[batch]`` / ``[1]``. On a conditional prior None
    means the null class (an error when it has none); an unconditional prior accepts only None
    or the null class."""
    labels = _from_numpy(labels)
    needs_names = isinstance(labels, str) or (
        isinstance(labels, (list, tuple)) and any(isinstance(v, str) for v in labels))
    space = LabelSpace.of(prior, with_names=needs_names)
    c = space.num_classes
    if labels is None:
        if c and not space.has_null:
            raise ValueError(
                f"{where}: this prior is class-conditional ({c} classes) without a null class, so "
                f"labels are required: {space.allowed()}"
            )
        return torch.full((batch,), -1, dtype=torch.long, device=device) if c else None
    if isinstance(labels, bool):
        raise ValueError(f"{where}: labels must be class ids or names, got a bool {labels!r}")
    if isinstance(labels, int):
        t = torch.tensor([labels], dtype=torch.long)
    elif isinstance(labels, str):
        t = torch.tensor([space.resolve(labels, where=f"{where}: label")], dtype=torch.long)
    elif isinstance(labels, (list, tuple)):
        if not labels or any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in labels):
            raise ValueError(f"{where}: labels must be a non-empty list of class ids or names, got {labels!r}")
        t = torch.tensor([v if isinstance(v, int) else space.resolve(v, where=f"{where}: label")
                          for v in labels], dtype=torch.long)
    elif isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"{where}: labels must be integer class indices (an int tensor [b]), got "
                             f"dtype {labels.dtype}")
        t = labels.reshape(-1) if labels.dim() <= 1 else labels
    else:
        raise ValueError(f"{where}: labels must be None, a class id or name, a list of them or an int "
                         f"tensor [b], got {type(labels).__name__}")
    if t.dim() != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"{where}: labels must have shape [b] = [{batch}] ({batch} entries, one per "
                         f"sample) or one entry (for all), got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.long)
    lo, hi = (int(v) for v in t.aminmax())  # one host sync
    if not c:
        if lo == hi == -1:
            return None
        raise ValueError(f"{where}: this prior is unconditional (num_classes = 0) but got class labels in "
                         f"[{lo}, {hi}]; pass labels=None (or -1), or load a class-conditional prior")
    if lo < (-1 if space.has_null else 0) or hi >= c:
        null = "" if space.has_null else "no null class and "
        raise ValueError(f"{where}: labels {t.tolist()[:16]} out of range; this prior has {null}{c} classes: "
                         f"use 0..{c - 1}" + (" or -1 (null / unconditional)" if space.has_null else ""))
    return t.expand(batch).clone()
