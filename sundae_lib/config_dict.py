"""Dataclass configs from plain mappings (JSON, TOML tables, keyword overrides): the one strict
coercer behind ``PriorConfig`` / ``VQGANConfig`` / ``VQLossConfig`` / ``PixelCodecConfig``
``from_dict`` and ``preset``, the model files' configs, and the trainer's TOML configs.

Two sources, one set of rules (unknown keys are an error that lists the valid ones; JSON / TOML
lists become tuples):

- a Python mapping (``table=None``): the dataclass validates its own values in ``__post_init__``;
  errors read ``"VQGANConfig: unknown key(s) ['chx']; valid keys are [...]"``;
- a table of a config file (``table="optim"``, ``""`` for the top level): every value is also
  checked against its field's annotation (ints widen to float, arrays to tuples of the declared
  length, nested dataclasses are tables built the same way), and errors name keys as the file
  spells them: ``"optim.lr expects float, got 'fast' (str)"``.

``config_property`` gives a model its read-only size attributes straight from its ``.config``.

Imports only the standard library (no torch), so ``sundae-train --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from .checks import is_int, is_number

__all__ = [
    "check_keys",
    "coerce_value",
    "config_from_dict",
    "config_property",
    "tupleize",
    "type_name",
]


def config_property(field: str, doc: str) -> property:
    """A read-only ``property`` that returns ``self.config.<field>``, for the sizes a model
    takes from its config: ``codebook_size = config_property("codebook_size", "...")`` in a class
    body reads as the hand-written ``@property`` would (assigning to it raises
    ``AttributeError``), and ``doc`` becomes its docstring. A plain function, not
    ``operator.attrgetter``: ``torch.compile`` traces it (an ``attrgetter`` call is a graph
    break inside the prior's forward)."""

    def read(self: Any) -> Any:
        return getattr(self.config, field)

    read.__name__ = field
    return property(read, doc=doc)


def tupleize(value: Any) -> Any:
    """Lists (at any depth) -> tuples, so configs read back from JSON / TOML compare equal to the
    ones written."""
    if isinstance(value, list):
        return tuple(tupleize(v) for v in value)
    return value


def check_keys(
    data: Mapping[str, Any],
    valid: Iterable[str],
    *,
    what: str = "",
    table: str | None = None,
    also_valid: Iterable[str] = (),
    error: type[ValueError] = ValueError,
) -> None:
    """Raise ``error`` when ``data`` has keys outside ``valid`` (and ``also_valid``, listed first
    in the message, e.g. a table's ``preset``), naming them and listing the valid keys.

    ``table`` (a config file's dotted table path, ``""`` = its top level) words the message for a
    config file; else ``what`` (the config's name) heads a message for Python callers."""
    valid = sorted(valid)
    unknown = sorted(set(data) - set(valid) - set(also_valid))
    if not unknown:
        return
    if table is None:
        raise error(f"{what}: unknown key(s) {unknown}; valid keys are {valid}")
    names = ", ".join(f"{table + '.' if table else ''}{k}" for k in unknown)
    raise error(
        f"unknown key(s) {names} in {_label(table)}; valid keys there: "
        f"{', '.join([*also_valid, *valid])}"
    )


def config_from_dict(
    cls: type,
    data: Any,
    *,
    what: str | None = None,
    table: str | None = None,
    error: type[ValueError] = ValueError,
) -> Any:
    """Build dataclass ``cls`` from the mapping ``data``, strictly; missing keys keep defaults.

    ``table=None`` (a Python mapping): lists become tuples and ``cls.__post_init__`` checks the
    values; ``what`` (default the class name) heads the errors. ``table`` = a config file's dotted
    table path (``""`` = top level): values are checked against the annotations first
    (:func:`coerce_value`) and a ``TypeError`` / ``ValueError`` from ``cls`` is re-raised as
    ``error`` prefixed with the table. ``error``: the exception class raised (a ``ValueError``
    subclass, e.g. the trainer's ``ConfigError``)."""
    what = what or cls.__name__
    if not isinstance(data, Mapping):
        if table is None:
            raise error(f"{what}: expected a mapping of settings, got {type(data).__name__}")
        raise error(
            f"{_label(table)} must be a table of settings, got {data!r} ({type(data).__name__})"
        )
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(data, fields, what=what, table=table, error=error)
    if table is None:
        return cls(**{k: tupleize(v) for k, v in data.items()})
    hints = typing.get_type_hints(cls)
    kwargs = {
        key: coerce_value(value, hints[key], f"{table}.{key}" if table else key, error=error)
        for key, value in data.items()
    }
    try:
        return cls(**kwargs)
    except error:
        raise
    except (TypeError, ValueError) as exc:
        raise error(f"{_label(table)}: {exc}") from exc


def coerce_value(value: Any, tp: Any, where: str, *, error: type[ValueError] = ValueError) -> Any:
    """``value`` checked against the annotation ``tp`` (``where`` names it in errors): ints widen
    to float (and integral floats narrow to int), lists become tuples of the declared length,
    unions try each arm, dataclasses are built from tables with :func:`config_from_dict`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce_value(value, arm, where, error=error)
            except error:
                pass
        raise error(f"{where} expects {type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, table=where, error=error)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise error(f"{where} expects {type_name(tp)}, got {value!r} ({type(value).__name__})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(
                coerce_value(v, args[0], f"{where}[{i}]", error=error) for i, v in enumerate(value)
            )
        if len(value) != len(args):
            raise error(
                f"{where} expects {type_name(tp)}, got {len(value)} values: {list(value)!r}"
            )
        return tuple(
            coerce_value(v, a, f"{where}[{i}]", error=error)
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise error(f"{where} expects a table, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if is_number(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise error(f"{where} expects {type_name(tp)}, got {value!r} ({type(value).__name__})")


def type_name(tp: Any) -> str:
    """How a config file would call the annotation ``tp``: ``float``, ``table``,
    ``array of 2 float``, ``array of int`` (any length), ``int or str``."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"array of {type_name(args[0])}"
        return f"array of {len(args)} {' / '.join(sorted({type_name(a) for a in args}))}"
    if origin in (dict, Mapping):
        return "table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _label(table: str) -> str:
    return f"[{table}]" if table else "the top level"
