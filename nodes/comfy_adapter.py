"""The one door to ComfyUI services: model folders, devices, dtypes, progress and interrupts.

Every ComfyUI import (``folder_paths``, ``comfy.utils``, ``comfy.model_management``) happens
here, lazily, inside a function, guarded by ``ImportError``, and only when ComfyUI is running
(it has imported ``folder_paths`` before loading any pack). Outside ComfyUI (unit tests,
scripts) the same functions fall back to plain behaviour: a small in-module folder registry, the
CUDA device if there is one, a progress bar that only logs, and an interrupt check that never
fires. Node modules import this file and nothing of ComfyUI.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..sundae_lib.dtypes import cpu_has_fast_bf16, preferred_dtype

logger = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODELS = PACK_ROOT / "shipped_models"
MODEL_FOLDERS = ("vqgan", "sundae")
# what a model file may end with (ComfyUI's supported_pt_extensions minus pickles we never load)
MODEL_EXTENSIONS = frozenset({".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"})
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Plain folder registry used when ComfyUI is absent: name -> list of directories (searched in
# order). Tests put temporary folders first with add_model_folder(..., first=True).
_fallback_folders: dict[str, list[str]] = {name: [str(SHIPPED_MODELS / name)] for name in MODEL_FOLDERS}


# --------------------------------------------------------------------------------------------
# lazy ComfyUI modules
# --------------------------------------------------------------------------------------------


def inside_comfyui() -> bool:
    """True when running inside ComfyUI (it imports ``folder_paths`` before any pack)."""
    return "folder_paths" in sys.modules


def _folder_paths():
    if not inside_comfyui():
        return None
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def _model_management():
    if not inside_comfyui():
        return None
    try:
        import comfy.model_management as model_management
    except ImportError:
        return None
    return model_management


def _comfy_utils():
    if not inside_comfyui():
        return None
    try:
        import comfy.utils as comfy_utils
    except ImportError:
        return None
    return comfy_utils


# --------------------------------------------------------------------------------------------
# model folders
# --------------------------------------------------------------------------------------------


def register_model_folders() -> None:
    """Register ``vqgan`` and ``sundae`` model folders: ``<models_dir>/<name>`` plus this pack's
    ``shipped_models/<name>``, keeping any paths the user's ``extra_model_paths.yaml`` already
    added (that file is applied before packs import). Idempotent."""
    fp = _folder_paths()
    for name in MODEL_FOLDERS:
        shipped = str(SHIPPED_MODELS / name)
        if fp is None:
            if shipped not in _fallback_folders.setdefault(name, []):
                _fallback_folders[name].append(shipped)
            continue
        fp.add_model_folder_path(name, os.path.join(fp.models_dir, name))
        fp.add_model_folder_path(name, shipped)
        paths, _exts = fp.folder_names_and_paths[name]
        # a name first created by add_model_folder_path gets an empty (accept-all) extension set
        fp.folder_names_and_paths[name] = (paths, set(MODEL_EXTENSIONS))


def add_model_folder(name: str, path: str | os.PathLike, *, first: bool = False) -> None:
    """Add a directory to model folder ``name`` (ComfyUI's registry when running inside it)."""
    fp = _folder_paths()
    if fp is not None:
        fp.add_model_folder_path(name, str(path), is_default=first)
        return
    paths = _fallback_folders.setdefault(name, [])
    path = str(path)
    if path in paths:
        paths.remove(path)
    if first:
        paths.insert(0, path)
    else:
        paths.append(path)


def model_folder_paths(name: str) -> list[str]:
    fp = _folder_paths()
    if fp is not None:
        try:
            return list(fp.get_folder_paths(name))
        except KeyError:
            return []
    return list(_fallback_folders.get(name, []))


# bounds of a model-folder listing (dropdowns are built on every /object_info request)
MAX_WALK_DEPTH = 16  # folder levels below a model root
MAX_WALK_DIRS = 10_000  # folders visited per root
_walk_warned: set[str] = set()


def _walk_model_files(root: str) -> list[str]:
    """Model files under ``root`` as relative ``/`` paths, following symlinked folders (as
    ComfyUI does) but never into a folder that is its own ancestor (a symlink loop), at most
    ``MAX_WALK_DEPTH`` levels deep and ``MAX_WALK_DIRS`` folders wide."""
    found: list[str] = []
    visited = 0
    limits: list[str] = []
    stack: list[tuple[str, str, frozenset]] = [(root, "", frozenset())]
    while stack:
        path, rel, ancestors = stack.pop()
        try:
            st = os.stat(path)
        except OSError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in ancestors:
            limits.append(f"symlink loop at {path!r} (skipped)")
            continue
        if visited >= MAX_WALK_DIRS:
            limits.append(f"more than {MAX_WALK_DIRS} folders (MAX_WALK_DIRS); the rest is not listed")
            break
        visited += 1
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                continue
            if is_dir:
                if entry.name.startswith("."):
                    continue
                if rel.count("/") >= MAX_WALK_DEPTH:  # the child would be one level deeper
                    limits.append(f"{entry.path!r} is deeper than {MAX_WALK_DEPTH} levels (MAX_WALK_DEPTH)")
                    continue
                subdirs.append((entry.path, f"{rel}{entry.name}/", ancestors | {ident}))
            elif os.path.splitext(entry.name)[1].lower() in MODEL_EXTENSIONS:
                found.append(f"{rel}{entry.name}")
        stack.extend(reversed(subdirs))
    if limits:
        message = f"model folder {root!r}: {'; '.join(limits[:3])}{' ...' if len(limits) > 3 else ''}"
        if message not in _walk_warned:  # listings repeat on every node-list refresh: warn once
            _walk_warned.add(message)
            logger.warning("%s", message)
    return found


def _is_diffusers_vqmodel(directory: str) -> bool:
    cfg = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as fh:
            return json.load(fh).get("_class_name") == "VQModel"
    except (OSError, ValueError, AttributeError):
        return False


def list_model_files(name: str, *, diffusers_vqmodels: bool = False) -> list[str]:
    """Model files of folder ``name`` as relative paths (sorted, unique). With
    ``diffusers_vqmodels``, diffusers ``VQModel`` folders (a ``config.json`` whose
    ``_class_name`` is ``VQModel``) are listed once as ``"<folder>/"`` instead of their files."""
    # our own bounded walk, also inside ComfyUI: folder_paths.get_filename_list follows
    # symlinks without loop detection, so one looping link would hang the node list
    files = [f for root in model_folder_paths(name) for f in _walk_model_files(root)]
    if not diffusers_vqmodels:
        return sorted(set(files))
    roots = model_folder_paths(name)
    out: set[str] = set()
    for rel in files:
        parent = rel.replace("\\", "/").rpartition("/")[0]
        if parent and any(_is_diffusers_vqmodel(os.path.join(r, parent)) for r in roots):
            out.add(parent + "/")
        else:
            out.add(rel)
    return sorted(out)


def resolve_model_path(name: str, entry: str) -> Path:
    """Absolute path of a dropdown entry of folder ``name`` (a file, or a ``"<folder>/"``
    diffusers entry). Raises FileNotFoundError naming the folders searched."""
    rel = entry.rstrip("/")
    if entry.endswith("/"):
        for root in model_folder_paths(name):
            candidate = Path(root) / rel
            if candidate.is_dir():
                return candidate
    else:
        fp = _folder_paths()
        if fp is not None:
            full = fp.get_full_path(name, rel)
            if full is not None:
                return Path(full)
        else:
            for root in model_folder_paths(name):
                candidate = Path(root) / rel
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(
        f"model {entry!r} was not found in the '{name}' model folders {model_folder_paths(name)}; "
        f"put the file into one of them (or add a '{name}:' entry to extra_model_paths.yaml) and "
        "refresh the node list"
    )


def file_signature(path: Path) -> str:
    """Changes when the model file is edited: mtime and size. For a diffusers folder, of the two
    files a load reads (its ``config.json`` and the weights file chosen): never a tree walk."""
    paths = _diffusers_files(path) if path.is_dir() else [path]
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


def _diffusers_files(folder: Path) -> list[Path]:
    from ..sundae_lib.vqgan_formats import DIFFUSERS_WEIGHTS

    for base in (folder, folder / "vqvae"):  # a VQModel folder, or a pipeline's vqvae/
        if (base / "config.json").is_file():
            weights = next((base / n for n in DIFFUSERS_WEIGHTS if (base / n).is_file()), None)
            return [base / "config.json"] + ([weights] if weights is not None else [])
    return [folder]  # not loadable; the loader explains why


# --------------------------------------------------------------------------------------------
# devices and dtypes
# --------------------------------------------------------------------------------------------


def torch_device() -> torch.device:
    """The device models run on: ComfyUI's choice (CPU under ``--cpu``), else CUDA if present."""
    mm = _model_management()
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE / MASK outputs live (CPU unless ComfyUI runs with ``--gpu-only``)."""
    mm = _model_management()
    if mm is not None:
        return mm.intermediate_device()
    return torch.device("cpu")


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto`` = ``sundae_lib.preferred_dtype(device)``: bf16 on GPUs with native bf16, else
    fp16; bf16 on CPUs with AMX / AVX512-BF16 measured faster than fp32, else fp32. Under ComfyUI
    its own judgement of the GPU (``--force-fp32``, GPUs slow in half precision) can turn a half
    dtype back into fp32. ``fp32`` / ``bf16`` / ``fp16`` are taken as asked."""
    if choice in _DTYPES:
        if device.type == "cpu" and (choice == "fp16" or (choice == "bf16" and not cpu_has_fast_bf16())):
            logger.warning("%s on this CPU is usually much slower than fp32; use dtype 'auto' or 'fp32'", choice)
        return _DTYPES[choice]
    if choice != "auto":
        raise ValueError(f"dtype {choice!r} is not one of {list(DTYPE_CHOICES)}")
    dtype = preferred_dtype(device)
    mm = _model_management()
    if mm is not None and device.type != "cpu" and dtype != torch.float32:
        half_ok = mm.should_use_bf16(device) if dtype == torch.bfloat16 else mm.should_use_fp16(device)
        if not half_ok:
            return torch.float32
    return dtype


def free_memory(num_bytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload other models until ``num_bytes`` fit on ``device`` (no-op outside)."""
    mm = _model_management()
    if mm is not None:
        mm.free_memory(num_bytes, device)


def soft_empty_cache() -> None:
    mm = _model_management()
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_exceptions() -> tuple[type[BaseException], ...]:
    """Exception types that mean "out of memory" (never a bare ``Exception``, which ComfyUI uses
    as its CPU fallback and which would turn every error into a retry)."""
    types: list[type[BaseException]] = [getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)]
    mm = _model_management()
    oom = getattr(mm, "OOM_EXCEPTION", None) if mm is not None else None
    if isinstance(oom, type) and oom is not Exception and issubclass(oom, BaseException):
        types.append(oom)
    return tuple(types)


# what allocators say when memory runs out: the CPU's (DefaultCPUAllocator: "can't allocate
# memory: you tried to allocate ..."), MPS ("MPS backend out of memory") and CUDA/HIP ("out of
# memory"). A CPU allocation failure is a plain RuntimeError, not torch.OutOfMemoryError.
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "defaultcpuallocator")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an out-of-memory error on any device: one of ``oom_exceptions()``, or a
    ``RuntimeError`` whose message is an allocator's out-of-memory message (the CPU allocator
    raises a plain ``RuntimeError``). Any other error is a real bug and must not be retried."""
    if isinstance(exc, oom_exceptions()):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


# --------------------------------------------------------------------------------------------
# interrupt and progress
# --------------------------------------------------------------------------------------------


def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException after the user pressed Cancel (no-op outside
    ComfyUI)."""
    mm = _model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class _LogProgressBar:
    """Stand-in for ``comfy.utils.ProgressBar`` outside ComfyUI: keeps the position, logs at
    debug level and drops previews."""

    def __init__(self, total: int):
        self.total = total
        self.current = 0

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        logger.debug("progress %d/%d%s", self.current, self.total, " (+preview)" if preview else "")


def progress_bar(total: int):
    """A ``comfy.utils.ProgressBar`` inside ComfyUI; a logging stand-in outside. Both take
    ``update_absolute(value, total, preview)`` with ``preview = ("JPEG", PIL.Image, max_size)``."""
    cu = _comfy_utils()
    if cu is not None:
        return cu.ProgressBar(total)
    return _LogProgressBar(total)
