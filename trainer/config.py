"""Training configs: a TOML file (or a shipped preset) + ``--set key.path=value`` overrides,
validated into strict dataclasses.

A config file is either one *stage* (top-level sections ``model``, ``data``, ``optim``, ``run``,
...) or a *pipeline* holding several stages as tables named after the commands
(``[vqgan.*]``, ``[latents.*]``, ``[prior.*]``); each command reads its own stage, and ``--set``
keys are relative to that stage (``--set optim.lr=1e-4``). Unknown keys and wrongly typed values
are a :class:`ConfigError` that lists the valid keys. This module imports no torch: ``--help``
stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..sundae_lib.prior_metadata import SamplingDefaults

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = Path(__file__).resolve().parent / "configs"
STAGES = ("vqgan", "latents", "prior")

DEVICES_HELP = "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config problem the user must fix (unknown key, bad type or value, missing file)."""


def _require_tomllib():
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError(
            "reading TOML configs needs Python >= 3.11 (stdlib tomllib) or the 'tomli' package: "
            "pip install tomli"
        )
    return tomllib


def _one_of(section: str, key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key} = {value!r} is not allowed; use one of {list(allowed)}")


def _at_least(section: str, key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{section}.{key} = {value!r} must be >= {low}")


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Where and how long to train; logging, evaluation, previews and checkpoints."""

    out_dir: str = "runs/sundae"
    seed: int = 0
    max_steps: int = 1000  # optimizer steps
    device: str = "auto"
    # auto = sundae_lib.preferred_dtype(device): bf16 on GPUs with native bf16, else fp16 + scaler;
    # bf16 on CPUs with AMX / AVX512-BF16 once measured faster (SUNDAE_CPU_DTYPE overrides), else fp32
    precision: str = "auto"
    deterministic: bool = False  # torch deterministic algorithms (exact resume on CPU)
    compile: bool = False  # torch.compile the model
    log_every: int = 50
    eval_every: int = 500  # 0 = never
    eval_batches: int = 4  # 0 = the whole eval split
    sample_every: int = 1000  # previews (sample / reconstruction grids); 0 = only at the end
    checkpoint_every: int = 500  # 0 = only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 3
    keep_best: bool = True  # also keep the checkpoint with the lowest eval loss
    num_workers: int = 0  # DataLoader workers for image folders
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    export: str = "model.safetensors"  # final model file, inside out_dir

    def __post_init__(self) -> None:
        s = "run"
        _at_least(s, "max_steps", self.max_steps, 1)
        _one_of(s, "precision", self.precision, PRECISIONS)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"run.device = {self.device!r} is not allowed; use {DEVICES_HELP}")
        for key in ("log_every", "eval_every", "eval_batches", "sample_every", "checkpoint_every", "num_workers"):
            _at_least(s, key, getattr(self, key), 0)
        _at_least(s, "keep_last", self.keep_last, 1)
        if not self.export.endswith(".safetensors") or "/" in self.export or "\\" in self.export:
            raise ConfigError(f"run.export = {self.export!r} must be a plain file name ending in .safetensors")
        if not self.out_dir:
            raise ConfigError("run.out_dir is empty; set it, e.g. --set run.out_dir=runs/my-run")


@dataclass
class VQGANRunConfig(RunConfig):
    recon_images: int = 8  # images in each reconstruction preview grid

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("run", "recon_images", self.recon_images, 1)


@dataclass
class OptimConfig:
    """AdamW, warmup then constant or cosine, clipping, accumulation and EMA."""

    batch_size: int = 32  # per device (micro-batch)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio * lr at run.max_steps)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_decay: float = 0.999  # 0 = no EMA weights

    def __post_init__(self) -> None:
        s = "optim"
        _at_least(s, "batch_size", self.batch_size, 1)
        _at_least(s, "grad_accum", self.grad_accum, 1)
        if not self.lr > 0:
            raise ConfigError(f"optim.lr = {self.lr!r} must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas = {list(self.betas)} must both be in [0, 1)")
        _at_least(s, "weight_decay", self.weight_decay, 0.0)
        _at_least(s, "warmup_steps", self.warmup_steps, 0)
        _one_of(s, "schedule", self.schedule, ("constant", "cosine"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio = {self.min_lr_ratio!r} must be in [0, 1]")
        _at_least(s, "grad_clip", self.grad_clip, 0.0)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay = {self.ema_decay!r} must be in [0, 1) (0 = off)")


@dataclass
class VQGANOptimConfig(OptimConfig):
    betas: tuple[float, float] = (0.5, 0.9)  # taming's VQ-GAN setting
    weight_decay: float = 0.0
    ema_decay: float = 0.0
    disc_lr: float = 0.0  # discriminator learning rate; 0 = same as lr


@dataclass
class DataConfig:
    """An image folder, an ``.npz`` image array or a latent (token) dataset."""

    path: str = ""
    kind: str = "auto"  # auto | folder | npz | latents
    resolution: int = 0  # square side after resize + crop; 0 = keep the native size
    resize: str = "shorter"  # shorter (then crop) | stretch | none
    crop: str = "center"  # center | random
    flip: bool = False  # random horizontal flips (latents: also use the stored flipped twins)
    channels: int = 0  # 0 = as stored (folders: RGB), 1 = grayscale, 3 = RGB
    labels: bool = True  # use class labels when the dataset has them
    eval_fraction: float = 0.02  # held-out share (by image id; flipped twins stay together)
    eval_max: int = 1000  # at most this many held-out images
    split_seed: int = 0
    limit: int = 0  # use only the first N images (sorted order); 0 = all
    verify: bool = True  # open every image header at start; unreadable files are skipped

    def __post_init__(self) -> None:
        s = "data"
        _one_of(s, "kind", self.kind, ("auto", "folder", "npz", "latents"))
        _at_least(s, "resolution", self.resolution, 0)
        _one_of(s, "resize", self.resize, ("shorter", "stretch", "none"))
        _one_of(s, "crop", self.crop, ("center", "random"))
        _one_of(s, "channels", self.channels, (0, 1, 3))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction = {self.eval_fraction!r} must be in [0, 1)")
        _at_least(s, "eval_max", self.eval_max, 0)
        _at_least(s, "limit", self.limit, 0)


@dataclass
class CodecConfig:
    """How tokens relate to pixels for the prior (training data and preview decoding)."""

    kind: str = "auto"  # auto (latents -> their VQ-GAN, images -> pixel) | pixel | vqgan
    levels: int = 256  # pixel codec: grey levels per channel (= codebook size)
    vqgan: str = ""  # VQ-GAN file / hf:// source; default for latents: the one they record

    def __post_init__(self) -> None:
        _one_of("codec", "kind", self.kind, ("auto", "pixel", "vqgan"))
        if not 2 <= self.levels <= 65536:
            raise ConfigError(f"codec.levels = {self.levels!r} must be in [2, 65536]")


@dataclass
class LossConfig:
    """The SUNDAE objective."""

    unroll_steps: int = 2
    # probability that a sample is corrupted only inside a random rectangle (or outside it) and
    # kept clean elsewhere through the unroll: teaches the prior the inpainting situation (a
    # clean part next to pure noise); 0 = plain SUNDAE
    region_corruption: float = 0.0

    def __post_init__(self) -> None:
        _at_least("loss", "unroll_steps", self.unroll_steps, 1)
        if not 0.0 <= self.region_corruption <= 1.0:
            raise ConfigError(
                f"loss.region_corruption = {self.region_corruption!r} must lie in [0, 1] (the "
                "probability of inpainting-style region corruption; 0 = plain SUNDAE)"
            )


@dataclass(frozen=True)
class SamplingConfig(SamplingDefaults):
    """``[sampling]``: the library's :class:`SamplingDefaults` (steps, temperature,
    update_proportion, early_stop, min_steps, cfg_scale; validated there), written into the
    exported prior as its recommended settings (``sundae.sampling``: the defaults of
    ``sample()``, ``sundae-train sample`` and the ComfyUI sampler), plus the preview grids' size
    and seed."""

    num_samples: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("sampling", "num_samples", self.num_samples, 1)


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainPriorConfig:
    """``sundae-train prior``. ``model``: a PriorConfig preset name or a table of PriorConfig
    fields with an optional ``preset`` key; ``codebook_size``, ``grid`` and ``num_classes``
    come from the data unless given."""

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "small"})
    data: DataConfig = field(default_factory=DataConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class PerceptualConfig:
    """LPIPS for VQ-GAN training, from files you provide (nothing is downloaded)."""

    lpips: str = ""  # LPIPS weights or a taming training checkpoint; "" = no perceptual loss
    vgg: str = ""  # VGG16 state dict, when the LPIPS file does not include the backbone


@dataclass
class TrainVQGANConfig:
    """``sundae-train vqgan``. ``model``: a VQGANConfig preset name or table (+ ``preset``);
    ``loss``: ``VQLossConfig`` fields (``sundae_lib.vq_losses``); ``disc_in_channels``
    defaults to the image channels."""

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    loss: dict[str, Any] = field(default_factory=dict)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    optim: VQGANOptimConfig = field(default_factory=VQGANOptimConfig)
    run: VQGANRunConfig = field(default_factory=VQGANRunConfig)


@dataclass
class LatentsConfig:
    """``sundae-train latents``: encode ``data`` with ``vqgan`` into a token dataset at ``out_dir``."""

    vqgan: str = ""  # VQ-GAN source: native / taming / diffusers file or folder, hf://...
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "latents"
    batch_size: int = 32
    shard_size: int = 4096  # images per shard (flipped twins count separately)
    device: str = "auto"
    precision: str = "auto"  # auto = fp32 (exact codes); bf16 / fp16 only when asked
    num_workers: int = 0

    def __post_init__(self) -> None:
        s = "latents"
        _at_least(s, "batch_size", self.batch_size, 1)
        _at_least(s, "shard_size", self.shard_size, 1)
        _one_of(s, "precision", self.precision, PRECISIONS)
        _at_least(s, "num_workers", self.num_workers, 0)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"latents.device = {self.device!r} is not allowed; use {DEVICES_HELP}")


STAGE_CLASSES: dict[str, type] = {
    "vqgan": TrainVQGANConfig,
    "latents": LatentsConfig,
    "prior": TrainPriorConfig,
}


# ----------------------------------------------------------------------------------------------
# strict dict -> dataclass with type checks: sundae_lib.config_dict, shared with the library
# (imported on use: importing the CLI for --help loads no sundae_lib)
# ----------------------------------------------------------------------------------------------


def build_dataclass(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from the config-file table ``data`` (at dotted path ``where``;
    ``""`` = the top level), strictly: unknown keys and bad types raise a :class:`ConfigError`
    naming the key and listing the valid ones; missing keys keep defaults. A stage's ``model``
    may be a preset name: ``model = "small"`` means ``[model] preset = "small"``."""
    from ..sundae_lib.config_dict import config_from_dict

    if isinstance(data, Mapping) and isinstance(data.get("model"), str):
        data = {**data, "model": {"preset": data["model"]}}
    return config_from_dict(cls, data, table=where, error=ConfigError)


def validate_model_table(table: Mapping[str, Any], config_cls: type, *, section: str = "model") -> tuple[str | None, dict]:
    """Split a ``model`` table into ``(preset, overrides)`` and check the override keys against
    the library config class (``PriorConfig`` / ``VQGANConfig``; other sections have no preset)."""
    from ..sundae_lib.config_dict import check_keys, tupleize

    table = dict(table)
    presets = section == "model"
    preset = table.pop("preset", None) if presets else None
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{section}.preset expects a preset name (str), got {preset!r}")
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
    check_keys(table, valid, table=section, also_valid=("preset",) if presets else (), error=ConfigError)
    return preset, {k: tupleize(v) for k, v in table.items()}


# ----------------------------------------------------------------------------------------------
# files, presets, overrides
# ----------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def find_config_file(source: str) -> Path:
    """``--config`` value -> file: an existing path, else a shipped preset name."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{source}.toml"
    if "/" not in source and preset.is_file():
        return preset
    raise ConfigError(
        f"--config {source!r} is neither an existing file nor a shipped preset; presets: "
        f"{', '.join(preset_names())} (or pass a path to a .toml / .json file)"
    )


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc}") from exc
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    try:
        return _require_tomllib().loads(text)
    except Exception as exc:  # tomllib.TOMLDecodeError
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{str(path)!r} is not valid TOML: {exc}") from exc


def select_stage(doc: Mapping[str, Any], stage: str, *, source: str = "config") -> dict[str, Any]:
    """A pipeline file holds one table per stage; a single-stage file is the stage itself."""
    stages = [s for s in STAGES if isinstance(doc.get(s), Mapping)]
    if not stages:
        return dict(doc)
    if stage not in stages:
        raise ConfigError(
            f"{source} is a pipeline config with stage(s) {', '.join(f'[{s}]' for s in stages)} "
            f"but no [{stage}] stage; add one or pass a config for '{stage}'"
        )
    extra = sorted(set(doc) - set(STAGES))
    if extra:
        raise ConfigError(
            f"{source}: key(s) {extra} sit beside the stage tables; move them into "
            f"{', '.join(f'[{s}]' for s in stages)}"
        )
    return dict(doc[stage])


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4). The value is read as a TOML literal
    (numbers, booleans, "strings", [arrays]); anything else is taken as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. --set optim.lr=1e-4")
    key, raw = text.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts):
        raise ConfigError(f"--set {text!r}: bad key {key!r}; use dotted names like optim.lr")
    raw = raw.strip()
    try:
        value = _require_tomllib().loads(f"v = {raw}")["v"]
    except ConfigError:
        raise
    except Exception:
        value = raw
    return parts, value


def apply_override(doc: dict[str, Any], parts: list[str], value: Any) -> None:
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and part == "model":  # preset name -> table
            child = node[part] = {"preset": child}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is a value ({child!r}), not a table"
            )
        node = child
    node[parts[-1]] = value


def load_stage(stage: str, source: str | None, overrides: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """Read ``--config`` (path or preset; ``None`` = all defaults), pick ``stage``, apply the
    ``--set`` overrides in order and validate. Returns ``(config dataclass, raw stage dict)``."""
    if stage not in STAGE_CLASSES:
        raise ConfigError(f"unknown stage {stage!r}; one of {list(STAGE_CLASSES)}")
    doc: dict[str, Any] = {}
    label = "defaults"
    if source:
        path = find_config_file(source)
        label = str(path)
        doc = select_stage(read_config_file(path), stage, source=label)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(doc, parts, value)
    return build_dataclass(STAGE_CLASSES[stage], doc, ""), doc


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------
# TOML writer (resolved configs beside checkpoints; readable back with --config)
# ----------------------------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Serialise nested dicts of scalars / arrays to TOML (``None`` values are left out)."""
    out: list[str] = []
    _emit_table(data, "", out)
    return "\n".join(out).strip() + "\n"


def _emit_table(data: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    if prefix:
        out.append(f"[{prefix}]")
    for key, value in data.items():
        if value is not None and not isinstance(value, Mapping):
            out.append(f"{_toml_key(str(key))} = {_toml_value(value)}")
    out.append("")
    for key, value in tables:
        _emit_table(value, f"{prefix}.{_toml_key(str(key))}" if prefix else _toml_key(str(key)), out)


def resolve_input_path(path: str, *, what: str) -> Path:
    """An input path: absolute as given; relative against the CWD, then the package root (so the
    shipped presets find ``data/mnist_train_4k.npz`` from anywhere)."""
    if not path:
        raise ConfigError(f"{what} is empty; set it (e.g. --set {what}=path/to/data)")
    p = Path(path).expanduser()
    if p.is_absolute():
        if not p.exists():
            raise FileNotFoundError(f"{what} = {path!r} does not exist")
        return p
    if p.exists():
        return p.resolve()
    q = PACKAGE_ROOT / p
    if q.exists():
        return q
    raise FileNotFoundError(
        f"{what} = {path!r} was found neither in the current directory ({Path.cwd()}) nor in the "
        f"package root ({PACKAGE_ROOT}); pass an absolute path"
    )
