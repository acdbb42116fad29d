"""``sundae-train prior``: train a SUNDAE prior on a latent dataset or on raw images (pixel codec).

One function, :func:`train_prior`, runs the whole loop on one process or under ``torchrun``
(DDP, gloo on CPU, nccl on GPU). The objective (corruption + unrolled denoising, all forward
passes) runs inside one DDP-wrapped module, so DDP sees one forward and one backward per
micro-batch. Rank 0 alone logs, writes previews and checkpoints; weights are saved unwrapped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import dist
from .checkpoint import (
    CONFIG,
    EMA,
    MODEL,
    STATE,
    CheckpointManager,
    disk_full_as_one_line,
    read_checkpoint_files,
)
from .config import (
    ConfigError,
    TrainPriorConfig,
    config_to_dict,
    resolve_input_path,
    to_toml,
    validate_model_table,
)
from .data import BatchLoader, BatchOrder, detect_kind, make_split, open_images
from .latents import LatentTokens, source_fingerprint
from .runtime import EMA as EMAWeights
from .runtime import (
    MetricsLog,
    StepTail,
    autocast,
    capture_rng,
    lr_factor,
    make_scaler,
    progress_bar,
    resolve_precision,
    restore_rng,
    run_info,
    save_grid,
    set_determinism,
)

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
    codec_meta: dict[str, str]  # sundae.codec (+ sundae.vqgan_file)
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
    from ..sundae_lib.codec_spec import CodecSpec

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
        meta = {"sundae.codec": str(spec), "sundae.vqgan_file": vq["file"], **_portable_source(source)}
        return PriorData(ds, "latents", ds.grid, ds.codebook_size, ds.label_map, meta, decoder_source=source)
    ds = open_images(cfg.data, seed=cfg.run.seed)
    h, w = ds.size
    if cfg.codec.kind in ("auto", "pixel"):
        codec = PixelCodec(levels=cfg.codec.levels, channels=ds.channels)
        meta = {"sundae.codec": codec.spec}
    else:
        if not cfg.codec.vqgan:
            raise ConfigError("codec.kind = 'vqgan' needs codec.vqgan = a VQ-GAN file to encode the images with")
        codec = load_vqgan(_model_source(cfg.codec.vqgan)).eval()
        sha, name = source_fingerprint(_model_source(cfg.codec.vqgan))
        meta = {"sundae.codec": str(CodecSpec.of_codec(codec, sha256=sha)), "sundae.vqgan_file": name,
                **_portable_source(cfg.codec.vqgan)}
    grid = tuple(codec.token_grid(h, w))
    return PriorData(ds, "images", grid, int(codec.codebook_size), ds.label_map, meta, encoder=codec, channels=ds.channels)


def _portable_source(source: Any) -> dict[str, str]:
    """``sundae.vqgan_source`` only for sources that mean the same on every machine (``hf://``):
    a local path is this machine's and never goes into a model file (the VQ-GAN is found by
    ``sundae.vqgan_file`` beside the prior, in a sibling ``vqgan/`` folder or among the shipped
    models)."""
    source = str(source)
    return {"sundae.vqgan_source": source} if source.startswith("hf://") else {}


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
# training
# ----------------------------------------------------------------------------------------------


def train_prior(cfg: TrainPriorConfig, *, resume: str = "auto", argv: list[str] | None = None) -> dict[str, Any]:
    """Train a prior as ``cfg`` says. Returns a summary dict (``step``, ``stopped``,
    ``export``, ``losses``, and on every rank ``model`` = the trained unwrapped prior)."""
    info = dist.setup(cfg.run.device)
    try:
        return _train(cfg, info, resume, argv)
    finally:
        dist.cleanup()


def _train(cfg: TrainPriorConfig, info: dist.DistInfo, resume: str, argv) -> dict[str, Any]:
    from ..sundae_lib import SundaePrior, save_prior

    run, opt = cfg.run, cfg.optim
    device = info.device
    set_determinism(run.deterministic)
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    out = Path(run.out_dir)
    data = open_prior_data(cfg)
    prior_cfg = resolve_prior_config(cfg.model, data)
    check_sampling(cfg, prior_cfg, data)
    resolved = config_to_dict(cfg)
    resolved["model"] = dataclasses.asdict(prior_cfg)
    split = make_split(data.dataset.group_ids(), cfg.data)
    meta = {
        **data.codec_meta,
        "sundae.label_map": json.dumps(data.label_map) if data.label_map else "",
        "sundae.sampling": json.dumps(config_to_dict(cfg.sampling)),
    }
    meta = {k: v for k, v in meta.items() if v}

    prior = SundaePrior(prior_cfg).to(device)
    prior.train()
    ema = EMAWeights(prior, opt.ema_decay) if opt.ema_decay > 0 else None
    objective: nn.Module = SundaeObjective(prior, cfg.loss.unroll_steps, cfg.loss.region_corruption)
    if run.compile:
        objective = torch.compile(objective)
    if info.enabled:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
        )
    amp_dtype, use_scaler = resolve_precision(run.precision, device)
    scaler = make_scaler(use_scaler, device)
    optimizer = torch.optim.AdamW(
        _param_groups(prior, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup=opt.warmup_steps, schedule=opt.schedule, max_steps=run.max_steps, min_ratio=opt.min_lr_ratio),
    )
    order = BatchOrder(split.train, opt.batch_size, rank=info.rank, world_size=info.world_size, seed=run.seed)
    loader = BatchLoader(data.dataset, order, num_workers=run.num_workers, pin_memory=device.type == "cuda")
    gen = _device_generator(device, run.seed * 1_000_003 + info.rank + 1)
    generators = {"loss": gen}

    ckpts = CheckpointManager(out / "checkpoints", keep_last=run.keep_last, keep_best=run.keep_best, enabled=info.is_main)
    start = 0
    best = None
    # rank 0 picks (and reads) the newest intact checkpoint; the others read the one it picked
    found = ckpts.open_resume(resume, read_checkpoint_files) if info.is_main else None
    resume_from = dist.broadcast_object(str(found[0]) if found is not None else None)
    if resume_from is not None:
        files = found[1] if found is not None else read_checkpoint_files(Path(resume_from))
        start, best = _load_checkpoint(Path(resume_from), files, prior, ema, optimizer, schedule, scaler, order,
                                       generators, info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(resolved), encoding="utf-8")
        (out / "split.json").write_text(json.dumps(split.info, indent=1) + "\n", encoding="utf-8")
        (out / "run.json").write_text(json.dumps({**run_info(argv), "world_size": info.world_size}, indent=2) + "\n")
    metrics = MetricsLog(out, enabled=info.is_main, tensorboard=run.tensorboard)
    if start:
        metrics.truncate_after(start)
    n_params = sum(p.numel() for p in prior.parameters())
    if info.is_main:
        logger.info(
            "prior: %.2fM parameters, grid %s, codebook %d, %d classes; %d train / %d eval items; "
            "batch %d x %d accum x %d ranks; precision %s on %s",
            n_params / 1e6, tuple(prior_cfg.grid), prior_cfg.codebook_size, prior_cfg.num_classes,
            len(split.train), len(split.eval), opt.batch_size, opt.grad_accum, info.world_size,
            {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype], device,
        )

    def write_checkpoint(step: int, eval_loss: float | None) -> None:
        rng_all = dist.gather_object(capture_rng(generators))
        if not info.is_main:
            return
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "order": order.state_dict(),
            "rng": rng_all,
            "best": tail.best,
        }
        step_meta = {**meta, "sundae.train_step": str(step)}
        writers = {
            MODEL: lambda p: save_prior(prior, p, metadata=step_meta),
            STATE: lambda p: torch.save(state, p),
            CONFIG: lambda p: Path(p).write_text(to_toml(resolved), encoding="utf-8"),
        }
        if ema is not None:
            writers[EMA] = lambda p: save_prior(ema.module, p, metadata=step_meta)
        ckpts.save(step, writers, meta={**run_info(argv), "world_size": info.world_size}, eval_loss=eval_loss)

    eval_model = ema.module if ema is not None else prior

    def evaluate(step: int) -> float:
        loss = _evaluate(eval_model, data, split.eval, cfg, info, device, amp_dtype)
        metrics.log(step, {"eval/loss": loss})
        return loss

    tail = StepTail(
        run, info, has_eval=len(split.eval) > 0, evaluate=evaluate, best=best, save=write_checkpoint,
        preview=lambda step: _preview(eval_model, data, cfg, out / "samples" / f"step-{step:08d}.png", device),
    )
    losses: list[float] = []
    stopped = None
    step = start
    bar = progress_bar(run, info, start, "prior")
    tic, seen = time.perf_counter(), 0
    running: list[float] = []
    with dist.StopSignal() as stop:
        while step < run.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(opt.grad_accum):
                x, y = next(loader)
                tokens, labels = _to_tokens(x, y, data, prior_cfg, device)
                sync = contextlib.nullcontext()
                if info.enabled and micro < opt.grad_accum - 1:
                    sync = objective.no_sync()
                with sync:
                    with autocast(device, amp_dtype):
                        loss, _ = objective(tokens, labels, gen)
                    scaler.scale(loss / opt.grad_accum).backward()
                step_loss += float(loss.detach()) / opt.grad_accum
                seen += tokens.shape[0]
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(prior.parameters(), opt.grad_clip if opt.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            if ema is not None:
                ema.update(prior)
            step += 1
            losses.append(step_loss)
            running.append(step_loss)
            if bar is not None:
                rate = seen * info.world_size / max(1e-9, time.perf_counter() - tic)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{rate:.1f}")
            if run.log_every and step % run.log_every == 0:
                mean_loss = dist.all_mean([float(np.mean(running))])[0]
                elapsed = time.perf_counter() - tic
                metrics.log(step, {
                    "train/loss": mean_loss,
                    "train/lr": schedule.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/images_per_s": seen * info.world_size / max(elapsed, 1e-9),
                })
                running, tic, seen = [], time.perf_counter(), 0
            if tail(step, stop):
                stopped = stop.received
                break
    if bar is not None:
        bar.close()
    metrics.close()
    export = None
    if stopped is None and info.is_main:
        export = out / run.export
        final_model = ema.module if ema is not None else prior
        with disk_full_as_one_line(f"the final model {export.name}", out):
            save_prior(final_model, export, metadata={**meta, "sundae.train_step": str(step)})
        logger.info("saved the final prior (%s weights) to %s", "EMA" if ema is not None else "raw", export)
    dist.barrier()
    return {
        "step": step,
        "stopped": stopped,
        "export": str(export) if export else None,
        "losses": losses,
        "best": tail.best,
        "model": prior,
        "ema": ema.module if ema is not None else None,
        "out_dir": str(out),
    }


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


def _load_checkpoint(folder, files, prior, ema, optimizer, schedule, scaler, order, generators, info) -> tuple[int, Any]:
    from ..sundae_lib._helpers import load_state_dict_strict

    weights, state = files
    load_state_dict_strict(
        prior, weights,
        what=f"checkpoint {folder} (saved by a run with another [model] config? use --resume never or a new --out)",
    )
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state.get("ema") is None:
            logger.warning("the checkpoint has no EMA weights: EMA restarts from the current weights")
            ema.module.load_state_dict(prior.state_dict())
        else:
            ema.load_state_dict(state["ema"])
    order.load_state_dict(state["order"])
    rng = state["rng"]
    if len(rng) == info.world_size:
        restore_rng(rng[info.rank], generators)
    else:
        logger.warning("checkpoint saved on %d rank(s), resuming on %d: RNG streams are reseeded", len(rng), info.world_size)
    best = tuple(state["best"]) if state.get("best") else None
    step = int(state["step"])
    if info.is_main:
        logger.info("resumed from %s at step %d", folder, step)
    return step, best


@torch.no_grad()
def _evaluate(model, data: PriorData, eval_items: np.ndarray, cfg: TrainPriorConfig, info, device, amp_dtype) -> float:
    """Mean SUNDAE loss on the held-out split with a fixed corruption seed (comparable across
    steps), labels kept (no class dropout), items sharded over ranks."""
    from ..sundae_lib import sundae_loss

    was_training = model.training
    model.eval()
    gen = _device_generator(device, 12345 + info.rank)
    mine = eval_items[info.rank :: info.world_size]
    bs = cfg.optim.batch_size
    batches = [mine[i : i + bs] for i in range(0, len(mine), bs)]
    if cfg.run.eval_batches:
        batches = batches[: cfg.run.eval_batches]
    total, count = 0.0, 0
    prior_cfg = model.config
    for idx in batches:
        x, y = data.dataset.get_batch(idx, 0)
        tokens, labels = _to_tokens(x, y, data, prior_cfg, device)
        with autocast(device, amp_dtype):
            loss = sundae_loss(model, tokens, labels, unroll_steps=cfg.loss.unroll_steps, class_dropout=0.0, generator=gen)
        total += float(loss) * len(idx)
        count += len(idx)
    model.train(was_training)
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
    was_training = model.training
    model.eval()
    n = s.num_samples
    labels = torch.arange(n, device=device) % model.config.num_classes if model.config.num_classes else None
    tokens = sample(
        model, batch_size=n, grid=tuple(model.config.grid), steps=s.steps, temperature=s.temperature,
        update_proportion=s.update_proportion, early_stop=s.early_stop, min_steps=s.min_steps,
        labels=labels, cfg_scale=s.cfg_scale, generator=_device_generator(device, s.seed),
    )
    model.train(was_training)
    codec.to(device)
    images = codec.decode(tokens)
    nrow = model.config.num_classes if model.config.num_classes and n % model.config.num_classes == 0 else None
    save_grid(images, path, nrow=nrow)
