"""``sundae-train prior``: train a SUNDAE prior on a latent dataset or on raw images (pixel codec).

:func:`train_prior` runs :class:`PriorTrainee` in the shared loop (``trainer/loop.py``: resume,
run folder, checkpoints, eval, previews, export) on one process or under ``torchrun`` (DDP, gloo
on CPU, nccl on GPU). The objective (corruption + unrolled denoising, all forward passes) runs
inside one DDP-wrapped module, so DDP sees one forward and one backward per micro-batch. Rank 0
alone logs, writes previews and checkpoints; weights are saved unwrapped.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..sundae_lib.codec_spec import CodecSpec
from ..sundae_lib.prior_metadata import PriorMetadata
from . import dist, loop
from .config import (
    ConfigError,
    TrainPriorConfig,
    config_to_dict,
    resolve_input_path,
    validate_model_table,
)
from .data import detect_kind, make_split, open_images
from .latents import LatentTokens, source_fingerprint
from .runtime import EMA as EMAWeights
from .runtime import autocast, make_scaler, resolve_precision, save_grid

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# data + codec
# ----------------------------------------------------------------------------------------------


@dataclass
class PriorData:
    dataset: Any  # get_batch(indices, epoch), group_ids(), label_map, num_classes
    kind: str  # latents | images
    grid: tuple[int, int]
    codebook_size: int
    label_map: list[str] | None
    recorded: PriorMetadata  # what the prior file will record about its codec
    encoder: Any = None  # codec that turns image batches into tokens (images only)
    decoder_source: str | None = None  # VQ-GAN source for previews (latents)
    channels: int = 1
    preview_codec: Any = None  # loaded on first use (rank 0)
    preview_tried: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.label_map) if self.label_map else 0


def open_prior_data(cfg: TrainPriorConfig) -> PriorData:
    from ..sundae_lib import PixelCodec, load_vqgan

    path = resolve_input_path(cfg.data.path, what="data.path")
    kind = detect_kind(path) if cfg.data.kind == "auto" else cfg.data.kind
    if kind == "latents":
        if cfg.codec.kind == "pixel":
            raise ConfigError("codec.kind = 'pixel' but data.path is a latent dataset; use codec.kind = 'auto' or 'vqgan'")
        ds = LatentTokens(path, cfg.data)
        vq = ds.manifest["vqgan"]
        source = cfg.codec.vqgan or vq["source"]
        spec = CodecSpec(kind="vqgan", sha256=vq["sha256"], factor=int(vq["downsample_factor"]),
                         channels=vq.get("config", {}).get("in_channels"))
        meta = PriorMetadata(codec=dataclasses.replace(spec, file=vq["file"]), vqgan_source=_portable_source(source))
        return PriorData(ds, "latents", ds.grid, ds.codebook_size, ds.label_map, meta, decoder_source=source)
    ds = open_images(cfg.data, seed=cfg.run.seed)
    h, w = ds.size
    if cfg.codec.kind in ("auto", "pixel"):
        codec = PixelCodec(levels=cfg.codec.levels, channels=ds.channels)
        meta = PriorMetadata(codec=CodecSpec.of_codec(codec))
    else:
        if not cfg.codec.vqgan:
            raise ConfigError("codec.kind = 'vqgan' needs codec.vqgan = a VQ-GAN file to encode the images with")
        codec = load_vqgan(_model_source(cfg.codec.vqgan)).eval()
        sha, name = source_fingerprint(_model_source(cfg.codec.vqgan))
        meta = PriorMetadata(codec=CodecSpec.of_codec(codec, sha256=sha, file=name),
                             vqgan_source=_portable_source(cfg.codec.vqgan))
    grid = tuple(codec.token_grid(h, w))
    return PriorData(ds, "images", grid, int(codec.codebook_size), ds.label_map, meta, encoder=codec, channels=ds.channels)


def _portable_source(source: Any) -> str | None:
    """``sundae.vqgan_source`` only for sources that mean the same on every machine (``hf://``):
    a local path is this machine's and never goes into a model file (the VQ-GAN is found by
    ``sundae.vqgan_file`` beside the prior, in a sibling ``vqgan/`` folder or among the shipped
    models)."""
    source = str(source)
    return source if source.startswith("hf://") else None


def _model_source(source: str) -> str:
    from ..sundae_lib._helpers import is_hf_source

    return source if is_hf_source(source) else str(resolve_input_path(source, what="VQ-GAN source"))


def resolve_prior_config(model: dict[str, Any], data: PriorData):
    """The ``[model]`` table + the data's facts -> ``PriorConfig``. ``codebook_size`` and
    ``grid`` always come from the data (an explicit, different value is an error);
    ``num_classes`` too, except that 0 trains an unconditional prior on labelled data."""
    from ..sundae_lib import PriorConfig

    preset, overrides = validate_model_table(model, PriorConfig)
    facts = {"codebook_size": data.codebook_size, "grid": tuple(data.grid), "num_classes": data.num_classes}
    for key in ("codebook_size", "grid"):
        if key in overrides and overrides[key] != facts[key]:
            raise ConfigError(
                f"model.{key} = {overrides[key]!r} but the data gives {facts[key]!r}; remove model.{key} "
                "(it is taken from the data) or change the data / codec"
            )
        overrides[key] = facts[key]
    if "num_classes" in overrides:
        n = overrides["num_classes"]
        if n and n != facts["num_classes"]:
            raise ConfigError(
                f"model.num_classes = {n} but the data has {facts['num_classes']} classes"
                + (" (unlabelled: put images in one subfolder per class)" if not facts["num_classes"] else "")
                + "; remove model.num_classes or set it to 0 for an unconditional prior"
            )
    else:
        overrides["num_classes"] = facts["num_classes"]
    try:
        if preset:
            return PriorConfig.preset(preset, **overrides)
        return PriorConfig.from_dict(overrides)
    except ValueError as exc:
        raise ConfigError(f"[model]: {exc}") from exc


def check_sampling(cfg: TrainPriorConfig, prior_cfg, data: PriorData) -> None:
    """The [sampling] settings (previews, and the defaults recorded in the exported prior) must
    suit the prior this run trains: checked before step 1, not at the first preview."""
    cfg_scale = cfg.sampling.cfg_scale
    if cfg_scale == 1.0 or (prior_cfg.num_classes > 0 and prior_cfg.null_class):
        return
    if data.num_classes == 0:
        why = f"data.path {cfg.data.path!r} has no labels, so the prior is unconditional"
    elif prior_cfg.num_classes == 0:
        why = "model.num_classes = 0 trains an unconditional prior"
    else:
        why = "model.null_class = false leaves no null class to guide against"
    raise ConfigError(
        f"sampling.cfg_scale = {cfg_scale} (classifier-free guidance) needs a class-conditional prior "
        f"with a null class, but {why}; set --set sampling.cfg_scale=1"
    )


# ----------------------------------------------------------------------------------------------
# the objective as one module (what DDP wraps)
# ----------------------------------------------------------------------------------------------


class SundaeObjective(nn.Module):
    """``forward(tokens, labels, generator) -> (loss, metrics)``: the whole unrolled SUNDAE
    loss, so every prior forward of a micro-batch happens inside one DDP forward."""

    def __init__(self, prior: nn.Module, unroll_steps: int, region_corruption: float = 0.0) -> None:
        super().__init__()
        self.prior = prior
        self.unroll_steps = unroll_steps
        self.region_corruption = region_corruption

    def forward(self, tokens, labels, generator=None, class_dropout=None):
        from ..sundae_lib import sundae_loss

        return sundae_loss(
            self.prior, tokens, labels, unroll_steps=self.unroll_steps, class_dropout=class_dropout,
            region_corruption=self.region_corruption, generator=generator, return_metrics=True,
        )


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings; none on biases and norm gains (ordered lists)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# training: the prior as a trainee of the shared loop (trainer/loop.py)
# ----------------------------------------------------------------------------------------------


def train_prior(cfg: TrainPriorConfig, *, resume: str = "auto", argv: list[str] | None = None) -> dict[str, Any]:
    """Train a prior as ``cfg`` says. Returns a summary dict (``step``, ``stopped``,
    ``export``, ``losses``, and on every rank ``model`` = the trained unwrapped prior)."""
    return loop.run_training(cfg, PriorTrainee, resume=resume, argv=argv)


class PriorTrainee:
    """A SUNDAE prior for :func:`~.loop.run_training`: the objective (corruption + unrolled
    denoising) in one DDP-wrapped module, AdamW with decay on matrices only, the loss's
    corruption generator (one stream per rank), the prior file with its codec and sampling
    metadata (``sundae.train_step`` per save)."""

    names = loop.Names("prior", "prior", preview="step-", loss="train/loss", postfix=("loss", "train/loss"),
                       score="eval/loss")

    def __init__(self, cfg: TrainPriorConfig, info: dist.DistInfo) -> None:
        from ..sundae_lib import SundaePrior

        run, opt = cfg.run, cfg.optim
        device = info.device
        self.cfg, self.info, self.device = cfg, info, device
        self.data = data = open_prior_data(cfg)
        self.prior_cfg = prior_cfg = resolve_prior_config(cfg.model, data)
        check_sampling(cfg, prior_cfg, data)
        self.resolved = config_to_dict(cfg)
        self.resolved["model"] = dataclasses.asdict(prior_cfg)
        self.split = make_split(data.dataset.group_ids(), cfg.data)
        # codec, class names and the [sampling] table (the recommended sampler settings)
        self.meta = dataclasses.replace(data.recorded, label_map=tuple(data.label_map) if data.label_map else None,
                                        sampling=cfg.sampling).to_metadata()

        self.model = prior = SundaePrior(prior_cfg).to(device)
        prior.train()
        self.ema = EMAWeights(prior, opt.ema_decay) if opt.ema_decay > 0 else None
        objective: nn.Module = SundaeObjective(prior, cfg.loss.unroll_steps, cfg.loss.region_corruption)
        if run.compile:
            objective = torch.compile(objective)
        self.objective = loop.ddp_wrap(objective, info)
        self.amp_dtype, use_scaler = resolve_precision(run.precision, device)
        self.scaler = make_scaler(use_scaler, device)
        self.optimizer = torch.optim.AdamW(
            _param_groups(prior, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps,
            **({"fused": True} if device.type == "cuda" else {}),
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, loop.lr_schedule(cfg))
        self.order, self.loader = loop.batch_stream(data.dataset, self.split.train, cfg, info)
        self.gen = _device_generator(device, run.seed * 1_000_003 + info.rank + 1)
        self.generators = {"loss": self.gen}

    def log_summary(self) -> None:
        cfg, prior_cfg, split = self.cfg, self.prior_cfg, self.split
        logger.info(
            "prior: %.2fM parameters, grid %s, codebook %d, %d classes; %d train / %d eval items; "
            "batch %d x %d accum x %d ranks; precision %s on %s",
            sum(p.numel() for p in self.model.parameters()) / 1e6, tuple(prior_cfg.grid), prior_cfg.codebook_size,
            prior_cfg.num_classes, len(split.train), len(split.eval), cfg.optim.batch_size, cfg.optim.grad_accum,
            self.info.world_size, {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype],
            self.device,
        )

    def train_step(self, step: int) -> loop.StepLog:
        accum = self.cfg.optim.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, seen = 0.0, 0
        for micro in range(accum):
            x, y = next(self.loader)
            tokens, labels = _to_tokens(x, y, self.data, self.prior_cfg, self.device)
            with loop.accumulation_sync(self.objective, self.info, micro, accum):
                with autocast(self.device, self.amp_dtype):
                    loss, _ = self.objective(tokens, labels, self.gen)
                self.scaler.scale(loss / accum).backward()
            step_loss += float(loss.detach()) / accum
            seen += tokens.shape[0]
        grad_norm = loop.optimizer_step(self.scaler, self.optimizer, self.model.parameters(), self.cfg.optim.grad_clip)
        self.schedule.step()
        return loop.StepLog({"train/loss": step_loss}, grad_norm, seen)

    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"eval/loss": _evaluate(model, self.data, self.split.eval, self.cfg, self.info, self.device, self.amp_dtype)}

    def preview(self, model: nn.Module, path: Path) -> None:
        _preview(model, self.data, self.cfg, path, self.device)

    def save_model(self, model: nn.Module, path: str | Path, step: int) -> None:
        from ..sundae_lib import save_prior

        save_prior(model, path, metadata={**self.meta, "sundae.train_step": str(step)})


def _to_tokens(x: torch.Tensor, y: torch.Tensor, data: PriorData, prior_cfg, device: torch.device):
    if data.kind == "latents":
        tokens = x.to(device, non_blocking=True)
    else:
        codec = data.encoder
        if next(iter(codec.parameters()), None) is not None:
            codec.to(device)
        tokens = codec.encode(x.to(device, non_blocking=True))
    labels = y.to(device, non_blocking=True) if prior_cfg.num_classes else None
    return tokens, labels


@torch.no_grad()
def _evaluate(model, data: PriorData, eval_items: np.ndarray, cfg: TrainPriorConfig, info, device, amp_dtype) -> float:
    """Mean SUNDAE loss on the held-out split with a fixed corruption seed (comparable across
    steps), labels kept (no class dropout), items sharded over ranks."""
    from ..sundae_lib import sundae_loss

    gen = _device_generator(device, 12345 + info.rank)
    total, count = 0.0, 0
    prior_cfg = model.config
    with loop.evaluating(model):
        for idx in loop.eval_batches(eval_items, cfg, info):
            x, y = data.dataset.get_batch(idx, 0)
            tokens, labels = _to_tokens(x, y, data, prior_cfg, device)
            with autocast(device, amp_dtype):
                loss = sundae_loss(model, tokens, labels, unroll_steps=cfg.loss.unroll_steps, class_dropout=0.0,
                                   generator=gen)
            total += float(loss) * len(idx)
            count += len(idx)
    s, c = dist.all_mean([total, float(count)])
    return s / max(c, 1e-9)


def load_preview_codec(data: PriorData):
    """The codec that turns sampled tokens into images (None when the VQ-GAN is unavailable)."""
    from ..sundae_lib import load_vqgan

    if data.kind == "images":
        return data.encoder
    try:
        return load_vqgan(_model_source(data.decoder_source)).eval()
    except (OSError, ValueError) as exc:
        logger.warning("previews disabled: cannot load the VQ-GAN %r (%s); set codec.vqgan", data.decoder_source, exc)
        return None


@torch.no_grad()
def _preview(model, data: PriorData, cfg: TrainPriorConfig, path: Path, device) -> None:
    from ..sundae_lib import sample

    if not data.preview_tried:
        data.preview_codec, data.preview_tried = load_preview_codec(data), True
    codec = data.preview_codec
    if codec is None:
        return
    s = cfg.sampling
    n = s.num_samples
    labels = torch.arange(n, device=device) % model.config.num_classes if model.config.num_classes else None
    with loop.evaluating(model):
        tokens = sample(model, batch_size=n, grid=tuple(model.config.grid), labels=labels,
                        generator=_device_generator(device, s.seed), **s.sample_kwargs())
    codec.to(device)
    images = codec.decode(tokens)
    nrow = model.config.num_classes if model.config.num_classes and n % model.config.num_classes == 0 else None
    save_grid(images, path, nrow=nrow)
