"""Small shared helpers for ``sundae_lib``: native checkpoint I/O, ``hf://`` sources, atomic
writes, strict state-dict loading and config serialisation (reading configs back:
``config_dict.py``).

Everything here is plain torch / safetensors / stdlib. Model files import from here instead of
re-implementing these pieces.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .config_dict import config_from_dict

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
# A model file may describe at most this many parameters (8 GB in fp32; the largest published
# SUNDAE prior has 214M, a taming VQ-GAN ~90M): configs beyond it are refused before building.
MAX_PARAMETERS = 2_000_000_000
META_MODEL_TYPE = "sundae.model_type"
META_FORMAT_VERSION = "sundae.format_version"
META_CONFIG = "sundae.config"
HF_PREFIX = "hf://"


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux
    ``/proc/self/status``); elsewhere set-and-restore, which is not thread-safe but brief."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file atomically: ``write(tmp_path)`` fills a temporary file in the same folder,
    which is fsync'ed and renamed over ``path``. A crash leaves either the old file or the new
    one, never a truncated file. The file gets the mode a plain ``open()`` would give it
    (``0o666`` less the umask: 0644 under umask 022), not ``mkstemp``'s private 0600, so a
    ComfyUI running as another user can read what the trainer wrote."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # after write(): a writer may have replaced the temporary file with a new one
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


# --------------------------------------------------------------------------------------------
# wrapped modules
# --------------------------------------------------------------------------------------------


def unwrap(model: Any) -> Any:
    """The bare model inside training wrappers, for reading its attributes (``codebook_size``,
    ``config``) and saving its weights (keys without a ``module.`` / ``_orig_mod.`` prefix).

    Peels, in any nesting (``compile(DDP(m))``, ``DDP(compile(m))``): ``torch.compile``'s
    ``OptimizedModule`` (``._orig_mod``), ``DistributedDataParallel`` and ``DataParallel``
    (``.module``). Nothing else: an object that merely has a ``.module`` attribute (an EMA
    holder, a user's container) is returned as it is, so the caller's type check names it.
    Forwards should still go through the wrapper (DDP's gradient sync, the compiled graph)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        else:
            return model


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else first buffer; the CPU for a module with
    neither)."""
    for p in module.parameters():
        return p.device
    for buf in module.buffers():
        return buf.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# dataclass configs (dict -> dataclass: config_dict.config_from_dict)
# --------------------------------------------------------------------------------------------


def config_to_json(config: Any) -> str:
    """Serialise a dataclass config to compact, key-sorted JSON."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# sources: local paths and hf://
# --------------------------------------------------------------------------------------------


def is_hf_source(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.startswith(HF_PREFIX)


def parse_hf_source(source: str) -> tuple[str, str]:
    """``hf://owner/repo/path/inside`` -> (``owner/repo``, ``path/inside``) (path may be '')."""
    rest = source[len(HF_PREFIX):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(
            f"{source!r} is not a valid Hugging Face source: use hf://owner/repo[/subfolder][/file]"
        )
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


HF_PROBE_TIMEOUT_S = 3.0  # how long the Hub (or the HTTPS proxy) may take to accept a connection
_HF_PROBE_TTL_S = 30.0  # one probe serves the downloads of one load (config + weights)
_hf_probe: tuple[float, str, str | None] | None = None  # (when, endpoint, why unreachable)


def _hub_unreachable(timeout: float) -> str | None:
    """None when a TCP connection to the Hub's endpoint (or to the proxy the environment names
    for it) opens within ``timeout`` seconds, else why not. huggingface_hub itself retries a
    dead network for ~25-50 s; this answers in ``timeout``. DNS lookups take no timeout, so the
    probe runs in a daemon thread that is abandoned when it is late."""
    import socket
    import threading
    import time
    import urllib.request
    from urllib.parse import urlparse

    global _hf_probe
    try:
        from huggingface_hub import constants

        endpoint = str(constants.ENDPOINT)
    except (ImportError, AttributeError):  # pragma: no cover
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    now = time.monotonic()
    if _hf_probe is not None and _hf_probe[1] == endpoint and now - _hf_probe[0] < _HF_PROBE_TTL_S:
        return _hf_probe[2]
    url = urlparse(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="sundae-hf-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        why = f"{host}:{port} did not answer within {timeout:g} s"
    elif outcome[0] is not None:
        why = f"{host}:{port}: {type(outcome[0]).__name__}: {outcome[0]}"
    else:
        why = None
    _hf_probe = (now, endpoint, why)
    return why


def hf_download(repo_id: str, filename: str, *, source: str | None = None) -> Path:
    """Download (or take from the local cache) one file of a Hub repository.

    Honours ``HF_HUB_OFFLINE``: offline, a file that is not cached raises a ``FileNotFoundError``
    that says how to fetch it. Online, the Hub is probed first (``HF_PROBE_TIMEOUT_S``): when it
    cannot be reached, a cached copy is used (with a warning) or the error comes at once, instead
    of after huggingface_hub's ~25-50 s of retries."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError("hf:// sources need the huggingface_hub package: pip install huggingface_hub") from exc
    label = source or f"hf://{repo_id}/{filename}"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    why = None if offline else _hub_unreachable(HF_PROBE_TIMEOUT_S)
    if why is not None:
        try:
            path = Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=True))
        except Exception as exc:  # LocalEntryNotFoundError and friends
            raise FileNotFoundError(
                f"{label}: the Hugging Face Hub cannot be reached ({why}) and {filename!r} is not in "
                f"the local cache. Check the network or proxy (HTTPS_PROXY) and retry, or download "
                f"it once where the Hub is reachable (huggingface-cli download {repo_id} {filename}); "
                "once cached, set HF_HUB_OFFLINE=1 to skip the network entirely"
            ) from exc
        logger.warning("%s: the Hugging Face Hub cannot be reached (%s); using the cached copy "
                       "(set HF_HUB_OFFLINE=1 to skip this check)", label, why)
        return path
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as exc:  # huggingface_hub raises several unrelated exception types
        name = type(exc).__name__
        if offline or "Offline" in name or "LocalEntryNotFound" in name:
            raise FileNotFoundError(
                f"{label}: {filename!r} is not in the local Hugging Face cache and offline mode is "
                f"on (HF_HUB_OFFLINE). Download it once with network access "
                f"(huggingface-cli download {repo_id} {filename}) or pass a local file path."
            ) from exc
        raise FileNotFoundError(f"{label}: could not fetch {filename!r} from {repo_id} ({name}: {exc})") from exc


def resolve_local(source: str | os.PathLike, *, what: str) -> Path:
    """A local path that must exist, with a clear error naming it."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what}: {str(path)!r} does not exist")
    return path


# --------------------------------------------------------------------------------------------
# native checkpoint format
# --------------------------------------------------------------------------------------------


def save_native(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    model_type: str,
    config_json: str,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a native ``.safetensors`` model file atomically (docs/design.md "Native checkpoint
    format"): tensors are made contiguous and cloned, so shared storage (tied weights) is fine."""
    from safetensors.torch import save_file

    metadata = {
        META_MODEL_TYPE: model_type,
        META_FORMAT_VERSION: FORMAT_VERSION,
        META_CONFIG: config_json,
    }
    if extra_metadata:
        metadata.update({str(k): str(v) for k, v in extra_metadata.items()})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (``{}`` when there is none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable .safetensors file ({type(exc).__name__}: {exc}); "
            "it may be truncated or of another format — download or export it again"
        ) from exc


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise ValueError(
            f"{str(path)!r} could not be read as .safetensors ({type(exc).__name__}: {exc}); "
            "the file may be truncated — download or export it again"
        ) from exc


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` from a ``.safetensors`` header, without reading tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for key in fh.keys():
                sl = fh.get_slice(key)
                out[key] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
            return out
    except Exception as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable .safetensors file ({type(exc).__name__}: {exc}); "
            "it may be truncated or of another format — download or export it again"
        ) from exc


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def safetensors_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"F32"`` ...); float32 for exotic ones,
    which only shape checks see."""
    return _SAFETENSORS_DTYPES.get(name, torch.float32)


class _SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Random fills are no-ops on meta tensors, but torch routes some of them (``normal_``)
    through Python references that import ``torch._dynamo`` (seconds): skip them."""

    SKIP = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                      "xavier_uniform_", "xavier_normal_", "orthogonal_", "bernoulli_",
                      "exponential_", "random_", "cauchy_", "log_normal_", "geometric_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIP:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``factory()`` with every tensor on the meta device: shapes without memory (and without
    running random initialisation)."""
    with torch.device("meta"), _SkipRandomInit():
        return factory()


def check_weights_fit(
    factory: Callable[[], torch.nn.Module],
    shapes: Mapping[str, Any],
    *,
    what: str,
    max_parameters: int = MAX_PARAMETERS,
) -> None:
    """Refuse, before anything is allocated, a config that builds more than ``max_parameters``
    parameters or whose state dict does not match ``shapes`` (key -> shape, or -> ``(shape,
    dtype)`` as :func:`read_safetensors_shapes` gives, or -> tensor). The model is built on the
    meta device, so a file claiming a huge config costs nothing to reject."""
    model = build_on_meta(factory)
    total = sum(p.numel() for p in model.parameters())
    if total > max_parameters:
        raise ValueError(
            f"{what}: the config describes a model of {total:,} parameters, more than the limit of "
            f"{max_parameters:,} (MAX_PARAMETERS, {max_parameters * 4 / 1e9:.0f} GB in fp32); the "
            "file's config is wrong or the model is far too large to load — check the file"
        )
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = _mismatches(own, {k: _shape_of(v) for k, v in shapes.items()})
    if problems:
        raise ValueError(f"{what}: the weights do not match the model config: " + "; ".join(problems))


def _shape_of(value: Any) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        return tuple(value[0])  # (shape, dtype name)
    return tuple(value)


def _mismatches(own: Mapping[str, tuple], theirs: Mapping[str, tuple]) -> list[str]:
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    bad_shapes = sorted(
        f"{k}: file {theirs[k]} vs model {own[k]}" for k in set(own) & set(theirs) if own[k] != theirs[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if bad_shapes:
        problems.append(f"shape mismatches {_short(bad_shapes)}")
    return problems


def read_native_header(path: str | os.PathLike, *, expected_type: str) -> tuple[dict, dict[str, str]]:
    """The config dict and string metadata of a native model file, reading only its header.

    Raises ``ValueError`` naming the file when it is not a native file of ``expected_type``."""
    path = Path(path)
    meta = read_safetensors_metadata(path)
    model_type = meta.get(META_MODEL_TYPE)
    if model_type is None:
        raise ValueError(
            f"{str(path)!r} has no '{META_MODEL_TYPE}' metadata: it is not a native comfyui-sundae "
            f"{expected_type} file"
        )
    if model_type != expected_type:
        raise ValueError(
            f"{str(path)!r} holds a '{model_type}' model, not a '{expected_type}' — "
            f"pick a {expected_type} file here"
        )
    version = meta.get(META_FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format version {version!r}; this comfyui-sundae reads version "
            f"{FORMAT_VERSION} — update comfyui-sundae"
        )
    try:
        config = json.loads(meta[META_CONFIG])
    except (KeyError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(
            f"{str(path)!r}: the '{META_CONFIG}' metadata is missing or not JSON; the file is damaged "
            "— export it again"
        ) from exc
    return config, meta


def load_native_model(
    path: str | os.PathLike,
    *,
    expected_type: str,
    config_cls: type,
    build: Callable[[Any], torch.nn.Module],
    what: str,
) -> tuple[torch.nn.Module, dict[str, str]]:
    """Read a native model file (``load_prior``, ``load_vqgan_native``): returns ``(model,
    metadata)``, the model on the CPU in the dtype ``build(config)`` gives (the stored dtype is
    cast on loading).

    In this order, so that a damaged or hostile file costs nothing: the header (model type,
    config JSON) -> the config (unknown keys and invalid values raise) -> the declared tensor
    shapes against ``build(config)`` on the meta device (:func:`check_weights_fit`: too large
    or not matching raises before anything is allocated or read) -> the model for real and its
    weights, strictly. ``what`` starts every error message (e.g. ``"load_prior('x.safetensors')"``)."""
    config_dict, meta = read_native_header(path, expected_type=expected_type)
    try:
        config = config_from_dict(config_cls, config_dict, what=config_cls.__name__)
    except ValueError as exc:
        raise ValueError(f"{what}: the file's config is invalid: {exc}") from exc
    check_weights_fit(lambda: build(config), read_safetensors_shapes(path), what=what)
    model = build(config)
    load_state_dict_strict(model, load_safetensors(path), what=what)
    return model, meta


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
    """``module.load_state_dict(strict=True)`` with an error that names missing and unexpected
    keys and mismatched shapes instead of torch's wall of text."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = _mismatches(own, {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        raise ValueError(f"{what}: the weights do not match the model config: " + "; ".join(problems))
    module.load_state_dict(dict(state_dict), strict=True)


def _short(items: Iterable[str], limit: int = 12) -> str:
    items = list(items)
    head = ", ".join(repr(i) for i in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{head}{more}]"


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_SHA_CACHE: dict[tuple, str] = {}


def source_sha256(path: str | os.PathLike) -> str:
    """The sha256 a prior records for its VQ-GAN: of the file, or for a folder (diffusers
    ``VQModel``) over its files' relative paths and hashes. Cached per path, size and mtime, so
    a large VQ-GAN is hashed once per process."""
    import hashlib

    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = (str(path.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _SHA_CACHE:
        if path.is_dir():
            h = hashlib.sha256()
            for f in files:
                h.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode())
            _SHA_CACHE[key] = h.hexdigest()
        else:
            _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


SHIPPED_DIR = Path(__file__).resolve().parents[1] / "shipped_models"


def shipped_names(kind: str) -> list[str]:
    """Names of the models shipped in ``shipped_models/<kind>`` (``kind``: "sundae" or "vqgan")."""
    return sorted(p.stem for p in (SHIPPED_DIR / kind).glob("*.safetensors"))


def resolve_shipped(source: str | os.PathLike, kind: str) -> str | os.PathLike:
    """A bare shipped model name (``"mnist-vq"``, ``"emoji-vq"``) -> its file in
    ``shipped_models/<kind>/``; anything else (paths, ``hf://``) unchanged. A name that is not
    an existing path and not shipped is left for the loader's own "does not exist" error, which
    then lists the shipped names."""
    if isinstance(source, str) and source and "/" not in source and "\\" not in source \
            and not source.endswith(".safetensors") and not Path(source).exists():
        candidate = SHIPPED_DIR / kind / f"{source}.safetensors"
        if candidate.is_file():
            return str(candidate)
    return source
