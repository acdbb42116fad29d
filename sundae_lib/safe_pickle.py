"""Weights-only loading of pickled PyTorch checkpoints (Lightning ``.ckpt``, ``.pth``, legacy
diffusers ``.bin``) without running any code from the file.

``torch.load(weights_only=True)`` only resolves allow-listed globals. Lightning checkpoints name
other classes too (callback classes as dict keys, ``AttributeDict`` hyper-parameters, pickled
omegaconf ``DictConfig`` trees, numpy scalars), so a plain weights-only load stops with
"Unsupported global". Here every such name that lies under a known-inert prefix is answered by
an *inert stand-in*: a fresh class registered under exactly that fully qualified name, which
absorbs construction arguments, calls (pickle REDUCE/NEWOBJ) and state (BUILD ->
``__setstate__``) and does nothing else. The stand-in is never the real class (a stand-in for
``pathlib.Path`` cannot write files), and neither Lightning nor omegaconf is imported.

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, a pickled
``torch.nn.Module``, ...) is refused *before* unpickling with an error that names it, so nothing
from the file runs. The allow-list is scoped (``torch.serialization.safe_globals``), never
process-wide (ComfyUI registers its own globals at import; we neither rely on nor disturb them).

Reference: checkpoint-formats.md §8.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Names under these prefixes are answered by inert stand-ins (checkpoint-formats.md §8.3).
INERT_PREFIXES: tuple[str, ...] = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
    "typing.",
    "pathlib.",
    "collections.",  # defaultdict / deque in callback state (OrderedDict, Counter are torch's)
    "numpy.dtypes.",  # numpy >= 1.25 dtype classes (Float64DType, ...)
)
# Exact names answered by inert stand-ins: numpy scalar / dtype / array reconstruction, old
# Lightning's argparse hyper-parameters, and plain builtin data types (e.g. a defaultdict's
# ``list`` factory). Callables that act (eval, exec, getattr, open, __import__, ...) are not here.
INERT_NAMES: frozenset[str] = frozenset(
    {
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.dtype",
        "numpy.ndarray",
        "_codecs.encode",
        "argparse.Namespace",
        *(
            f"builtins.{t}"
            for t in (
                "list",
                "dict",
                "tuple",
                "set",
                "frozenset",
                "int",
                "float",
                "str",
                "bool",
                "bytes",
                "slice",
                "object",
            )
        ),
    }
)
# Stand-ins that must behave as a plain ``dict`` because the pickle fills them with SETITEMS
# (the weights-only unpickler only sets items on dict / OrderedDict / Counter).
_DICT_LIKE_SUFFIXES: tuple[str, ...] = (".AttributeDict",)
_DICT_LIKE_NAMES: frozenset[str] = frozenset({"collections.defaultdict", "builtins.dict"})

_MAX_ROUNDS = 256  # distinct globals we are willing to discover one error at a time

_UNSUPPORTED_RE = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_BLOCKED_RE = re.compile(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked")


class UnsafeCheckpointError(ValueError):
    """The checkpoint references a global that is not known to be inert; nothing was run."""


class InertStandIn:
    """Base of the inert stand-ins. Instances keep what the pickle handed them (for debugging)
    and have no behaviour: no methods beyond these, no real base class."""

    __sundae_name__ = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        self = object.__new__(cls)
        object.__setattr__(self, "_standin_args", args)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # absorb construction arguments
        pass

    def __setstate__(self, state: Any) -> None:  # absorb pickled state (BUILD)
        object.__setattr__(self, "_standin_state", state)

    def __repr__(self) -> str:
        return f"<inert stand-in for {type(self).__sundae_name__}>"


class _DictStandIn(InertStandIn):
    """A stand-in whose construction yields a plain ``dict`` (AttributeDict, defaultdict)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        return {}


_STANDIN_CACHE: dict[str, type] = {}
# torch's safe_globals context edits one process-wide set; serialise our scoped loads so that one
# load leaving its context cannot remove entries another load still needs
_LOAD_LOCK = threading.Lock()


def is_inert_name(name: str) -> bool:
    """True when ``name`` (``module.QualName``) may be answered by an inert stand-in."""
    return name in INERT_NAMES or name.startswith(INERT_PREFIXES)


def stand_in(name: str) -> type:
    """The inert stand-in class registered under ``name`` (created once per name).

    Raises ``UnsafeCheckpointError`` for names outside the inert prefixes."""
    if not is_inert_name(name):
        raise UnsafeCheckpointError(f"refusing to stand in for {name!r}: not a known-inert global")
    cls = _STANDIN_CACHE.get(name)
    if cls is None:
        module, _, qualname = name.rpartition(".")
        dict_like = name in _DICT_LIKE_NAMES or (
            name.endswith(_DICT_LIKE_SUFFIXES)
            and name.startswith(("pytorch_lightning.", "lightning.", "lightning_fabric."))
        )
        base = _DictStandIn if dict_like else InertStandIn
        cls = type(
            qualname,
            (base,),
            {"__module__": module, "__qualname__": qualname, "__sundae_name__": name},
        )
        _STANDIN_CACHE[name] = cls
    return cls


def _refusal(path: Path, name: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{what}: refusing to load {str(path)!r}: its pickle references the global {name!r}, which "
        "is not a known-inert Lightning / omegaconf / numpy name; unpickling it could run code, so "
        "nothing from the file was executed. If you trust the file, convert its weights to "
        ".safetensors in a separate Python session (torch.load(path, weights_only=False)"
        "['state_dict'] -> safetensors.torch.save_file) and load that instead."
    )


def _name_from_error(message: str) -> tuple[str | None, bool]:
    """(global name, blocked?) parsed from a weights-only ``UnpicklingError`` message."""
    m = _BLOCKED_RE.search(message)
    if m:
        return m.group(1), True
    m = _UNSUPPORTED_RE.search(message)
    if m:
        name = m.group(1)
        # torch strips the "builtins." prefix in this message
        return (name if "." in name else f"builtins.{name}"), False
    return None, False


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _core_message(exc: BaseException) -> str:
    """The informative line of a torch.load error (torch wraps it in a long explanation)."""
    text = str(exc).strip()
    m = re.search(r"WeightsUnpickler error: (.*)", text)
    if m:
        return m.group(1).strip()
    line = text.splitlines()[0] if text else "no details"
    return line if len(line) <= 300 else line[:300] + "..."


def _corrupt(path: Path, what: str, fmt: str, exc: BaseException) -> ValueError:
    return ValueError(
        f"{what}: could not read {str(path)!r} as a {fmt} ({type(exc).__name__}: "
        f"{_core_message(exc)}); the file is truncated, corrupt or not a weights checkpoint — "
        "download or export it again, or convert it to .safetensors"
    )


def safe_torch_load(path: str | os.PathLike, *, what: str = "load_vqgan") -> Any:
    """Load a ``torch.save`` file with ``weights_only=True`` on the CPU, standing in for
    known-inert globals (see the module docstring) and refusing every other global.

    Returns the unpickled object (stand-ins in place of Lightning / omegaconf / numpy objects;
    tensors are real). Raises ``UnsafeCheckpointError`` (a ``ValueError``) naming a refused global,
    or ``ValueError`` for a truncated / unreadable file."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{what}: {str(path)!r} is empty (0 bytes) — download or export it again")
    zip_format = _is_zip(path)
    fmt = "PyTorch zip checkpoint" if zip_format else "PyTorch checkpoint (legacy pickle format)"

    needed: set[str] = set()
    if zip_format:
        try:
            needed.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError here
            raise _corrupt(path, what, fmt, exc) from exc
    _check_names(path, needed, what)

    for _ in range(_MAX_ROUNDS):
        allow = [(stand_in(n), n) for n in sorted(needed)]
        try:
            with _LOAD_LOCK, torch.serialization.safe_globals(allow):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            name, blocked = _name_from_error(str(exc))
            if name is None:
                raise _corrupt(path, what, fmt, exc) from exc
            if blocked or not is_inert_name(name):
                raise _refusal(path, name, what) from None
            if name in needed:  # allowed yet still failing: not something a stand-in can absorb
                raise _corrupt(path, what, fmt, exc) from exc
            logger.debug("%s: standing in for %s", path.name, name)
            needed.add(name)
    raise ValueError(
        f"{what}: {str(path)!r} references more than {_MAX_ROUNDS} distinct globals; refusing it"
    )


def _check_names(path: Path, names: Iterable[str], what: str) -> None:
    for name in sorted(names):
        module = name.split(".", 1)[0]
        if module in {"os", "posix", "nt", "sys"} or not is_inert_name(name):
            raise _refusal(path, name, what)
