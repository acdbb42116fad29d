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
from the file runs. The allow-list is scoped to the load, never process-wide: the stand-ins are visible only to the unpickler of the load that asked for them
(a copy of torch's weights-only unpickler whose user allow-list is read from a context variable),
so a plain ``torch.load(weights_only=True)`` running at the same time in another thread never
accepts them. ComfyUI's own process-wide registrations are honoured as ``torch.load`` would.

Memory: a file never makes us allocate much more than its own size. Storages the pickle declares
may total at most the file's size (legacy format) or the records' inflated size (zip), and the
zip records may inflate to at most ``MAX_INFLATION`` times the file (``torch.save`` stores them
uncompressed); both are checked before any tensor data is read.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import types
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._weights_only_unpickler as _wo

logger = logging.getLogger(__name__)

# Names under these prefixes are answered by inert stand-ins: the classes Lightning checkpoints
# name for callbacks, hyper-parameters and configs, none of which the weights need.
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
# Only for the fallback path (TORCH_FORCE_WEIGHTS_ONLY_LOAD set, or a torch whose weights-only
# unpickler we cannot scope): torch's safe_globals context edits one process-wide set, so
# serialise those loads so that one load leaving its context cannot remove entries another needs.
_LOAD_LOCK = threading.Lock()

# zip records may inflate to at most this many times the file's size (torch.save writes them
# uncompressed: real checkpoints are ~1x), plus this slack for the small metadata records
MAX_INFLATION = 4
_INFLATION_SLACK = 1 << 20


class CheckpointSizeError(ValueError):
    """The checkpoint declares more data than its file can hold; nothing was allocated."""


# --------------------------------------------------------------------------------------------
# a weights-only unpickler whose allow-list is scoped to one load
# --------------------------------------------------------------------------------------------


@dataclass
class _LoadScope:
    """What one ``safe_torch_load`` call allows: stand-ins by name, and a storage byte budget."""

    allowed: dict[str, Any]
    max_storage_bytes: int
    origin: str
    declared: dict[str, int] = field(default_factory=dict)

    def declare(self, key: str, nbytes: int) -> None:
        if key in self.declared:
            return
        self.declared[key] = nbytes
        total = sum(self.declared.values())
        if total > self.max_storage_bytes:
            raise CheckpointSizeError(
                f"{self.origin}: its pickle declares {total:,} bytes of tensor storage (so far), "
                f"more than the {self.max_storage_bytes:,} bytes its data can hold; the file is "
                "corrupt or crafted — nothing was allocated. Download or export it again, or "
                "convert it to .safetensors"
            )


_SCOPE: contextvars.ContextVar[_LoadScope | None] = contextvars.ContextVar(
    "sundae_safe_pickle_scope", default=None
)


def _scoped_user_globals() -> dict[str, Any]:
    """torch's process-wide user allow-list plus the stand-ins of the load running in this
    context (these win: a stand-in is inert, whatever else was registered under its name)."""
    rc = _wo._get_user_allowed_globals()
    scope = _SCOPE.get()
    if scope is not None:
        rc.update(scope.allowed)
    return rc


def _element_size(storage_type: Any) -> int:
    dtype = getattr(storage_type, "dtype", None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 1


def _counting(persistent_load):
    """Wrap torch's ``persistent_load``: every storage the pickle declares is counted against
    the load's byte budget *before* torch allocates (legacy format) or reads (zip) it."""

    def load(saved_id):
        scope = _SCOPE.get()
        if scope is not None and isinstance(saved_id, tuple) and len(saved_id) >= 5:
            kind = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
            numel = saved_id[4]
            if kind == "storage" and isinstance(numel, int):
                scope.declare(str(saved_id[2]), max(numel, 0) * _element_size(saved_id[1]))
        return persistent_load(saved_id)

    return load


def _rebind_load(fn):
    """torch's weights-only ``Unpickler.load`` with ``_get_user_allowed_globals`` resolved to
    :func:`_scoped_user_globals` (a copy of the function over a copy of its globals: torch's
    module is left as it is)."""
    scope_globals = dict(fn.__globals__)
    scope_globals["_get_user_allowed_globals"] = _scoped_user_globals
    new = types.FunctionType(fn.__code__, scope_globals, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


# torch internals this relies on; when they change, loads fall back to the locked global path
def _scopable() -> bool:
    code = getattr(getattr(getattr(_wo, "Unpickler", None), "load", None), "__code__", None)
    return (
        code is not None
        and "_get_user_allowed_globals" in code.co_names
        and callable(getattr(_wo, "_get_user_allowed_globals", None))
    )


_SCOPABLE = _scopable()


if _SCOPABLE:

    class _ScopedUnpickler(_wo.Unpickler):
        """torch's weights-only unpickler, reading the user allow-list of the current load."""

        load = _rebind_load(_wo.Unpickler.load)

        @property
        def persistent_load(self):
            return self.__dict__.get("_sundae_persistent_load") or _wo.Unpickler.persistent_load.__get__(self)

        @persistent_load.setter
        def persistent_load(self, fn) -> None:  # torch's _load / _legacy_load set it
            self.__dict__["_sundae_persistent_load"] = _counting(fn)

    def _scoped_load(file, *, encoding: str = "ASCII", **_ignored: Any):
        return _ScopedUnpickler(file, encoding=encoding).load()

    # a ``pickle_module`` for torch.load: weights-only semantics, allow-list scoped to the load
    _PICKLE_MODULE = types.ModuleType("sundae_weights_only_unpickler")
    _PICKLE_MODULE.Unpickler = _ScopedUnpickler
    _PICKLE_MODULE.load = _scoped_load
    _PICKLE_MODULE.UnpicklingError = _wo.UnpicklingError


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


def is_zip_checkpoint(path: Path) -> bool:
    """True for the zip format of ``torch.save`` (False: the legacy pickle format)."""
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


def safe_torch_load(
    path: str | os.PathLike, *, what: str = "load_vqgan", map_location: str | torch.device = "cpu"
) -> Any:
    """Load a ``torch.save`` file with weights-only unpickling, standing in for known-inert
    globals (see the module docstring) and refusing every other global.

    ``map_location="meta"`` reads only the pickle: tensors come back on the meta device with
    their declared shapes and no data is read (zip format), so a caller can check them before
    paying for the load.

    Returns the unpickled object (stand-ins in place of Lightning / omegaconf / numpy objects;
    tensors are real). Raises ``UnsafeCheckpointError`` (a ``ValueError``) naming a refused global,
    ``CheckpointSizeError`` when the file declares more data than it can hold, or ``ValueError``
    for a truncated / unreadable file."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{what}: {str(path)!r} is empty (0 bytes) — download or export it again")
    zip_format = is_zip_checkpoint(path)
    fmt = "PyTorch zip checkpoint" if zip_format else "PyTorch checkpoint (legacy pickle format)"
    # what the pickle may declare: the legacy format stores the bytes in the file itself; a zip
    # stores them in records whose inflated sizes the central directory declares
    budget = _check_zip_records(path, size, what) if zip_format else size

    needed: set[str] = set()
    if zip_format:
        try:
            needed.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError here
            raise _corrupt(path, what, fmt, exc) from exc
    _check_names(path, needed, what)

    for _ in range(_MAX_ROUNDS):
        allow = {n: stand_in(n) for n in sorted(needed)}
        scope = _LoadScope(allowed=allow, max_storage_bytes=budget, origin=f"{what}: {str(path)!r}")
        try:
            return _load_scoped(path, scope, map_location)
        except CheckpointSizeError:
            raise
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


def _force_weights_only_env() -> bool:
    return os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in {"1", "y", "yes", "true"}


def _load_scoped(path: Path, scope: _LoadScope, map_location: Any) -> Any:
    """One ``torch.load`` whose allow-list additions only this load sees."""
    if _SCOPABLE and not _force_weights_only_env():
        token = _SCOPE.set(scope)
        try:
            # weights_only=False only because torch refuses a pickle_module otherwise: the
            # module *is* torch's weights-only unpickler (scoped allow-list), and TorchScript
            # archives, which torch.load would hand to torch.jit.load, were refused beforehand
            return torch.load(
                str(path), map_location=map_location, pickle_module=_PICKLE_MODULE, weights_only=False
            )
        finally:
            _SCOPE.reset(token)
    # fallback: torch's process-wide allow-list, held only for the duration of the load
    logger.debug("safe_torch_load: process-wide allow-list (unscopable torch or forced weights_only)")
    allow = [(cls, name) for name, cls in scope.allowed.items()]
    with _LOAD_LOCK, torch.serialization.safe_globals(allow):
        return torch.load(str(path), map_location=map_location, weights_only=True)


def _check_zip_records(path: Path, size: int, what: str) -> int:
    """Read the zip's central directory (no record is inflated): refuse TorchScript archives and
    records that would inflate past ``MAX_INFLATION`` × the file size. Returns the total declared
    inflated size of the data records (the storage budget of the pickle)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(
            f"{what}: could not read {str(path)!r} as a PyTorch zip checkpoint ({type(exc).__name__}: "
            f"{exc}); the file is truncated or corrupt — download or export it again"
        ) from exc
    names = [i.filename.split("/", 1)[-1] for i in infos]
    if "constants.pkl" in names:
        raise ValueError(
            f"{what}: {str(path)!r} is a TorchScript archive (compiled code, not a weights "
            "checkpoint); export the model's state_dict to .safetensors and load that"
        )
    inflated = sum(i.file_size for i in infos)
    limit = MAX_INFLATION * size + _INFLATION_SLACK
    if inflated > limit:
        raise CheckpointSizeError(
            f"{what}: {str(path)!r} ({size:,} bytes) declares {inflated:,} bytes once unzipped "
            f"({inflated / size:.0f}x); at most {MAX_INFLATION}x the file size is accepted "
            f"(MAX_INFLATION): torch.save stores tensors uncompressed, so this archive was "
            "re-compressed or crafted — nothing was inflated. Re-save it with torch.save or "
            "convert it to .safetensors"
        )
    return sum(i.file_size for i, n in zip(infos, names, strict=True) if n.startswith("data/"))


def _check_names(path: Path, names: Iterable[str], what: str) -> None:
    for name in sorted(names):
        module = name.split(".", 1)[0]
        if module in {"os", "posix", "nt", "sys"} or not is_inert_name(name):
            raise _refusal(path, name, what)
