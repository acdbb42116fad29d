"""``sundae-train vqgan``: train a VQ-GAN codec with ``sundae_lib.vq_losses.VQGANLoss``.

Per optimizer step: generator micro-batches (reconstruction L1 [+ LPIPS] + adaptive GAN term once
``loss.disc_start`` is reached + codebook/commitment), one generator update, the codebook remedy
(EMA / dead-code restart) and, from ``disc_start`` on, discriminator micro-batches on the
detached reconstructions with the discriminator's own optimizer. The generator objective runs
inside one DDP-wrapped module (encode, quantize, decode, loss); the discriminator is wrapped
separately and only the bare, frozen copy is used in the generator step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
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
from .config import ConfigError, TrainVQGANConfig, config_to_dict, to_toml, validate_model_table
from .data import BatchLoader, BatchOrder, make_split, open_images
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
    to_float,
)

logger = logging.getLogger(__name__)


def resolve_vqgan_config(model: dict[str, Any], channels: int):
    """``[model]`` -> ``VQGANConfig``; ``in_channels`` / ``out_ch`` default to the data's."""
    from ..sundae_lib import VQGANConfig

    preset, overrides = validate_model_table(model, VQGANConfig)
    for key in ("in_channels", "out_ch"):
        if key in overrides and overrides[key] != channels:
            raise ConfigError(f"model.{key} = {overrides[key]} but the images have {channels} channel(s); set data.channels")
        overrides[key] = channels
    try:
        cfg = VQGANConfig.preset(preset, **overrides) if preset else VQGANConfig.from_dict(overrides)
    except ValueError as exc:
        raise ConfigError(f"[model]: {exc}") from exc
    if cfg.quantizer != "vq" or cfg.remap_used:
        raise ConfigError("training supports quantizer = 'vq' without remap (remap_used = 0) only")
    return cfg


def resolve_loss_config(loss: dict[str, Any], channels: int):
    from ..sundae_lib.vq_losses import VQLossConfig

    table = {"disc_in_channels": channels, **loss}
    try:
        return VQLossConfig.from_dict(table)
    except ValueError as exc:
        raise ConfigError(f"[loss]: {exc}") from exc


class GeneratorObjective(nn.Module):
    """``forward(x, step) -> (loss, log, recon, z_e, tokens)`` for the autoencoder. The loss
    module (with the discriminator) is held outside the registered submodules so that DDP only
    synchronises the VQ-GAN's own parameters."""

    def __init__(self, vqgan: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.vqgan = vqgan
        self._loss = (loss,)

    def forward(self, x: torch.Tensor, step: int):
        loss_fn = self._loss[0]
        z_e = self.vqgan.encode_to_latent(x)
        z_q, codebook_loss, tokens = loss_fn.quantize(z_e, self.vqgan.quantize.embedding.weight)
        recon = self.vqgan.decode_codes(z_q)
        loss, log = loss_fn.generator_step(
            x, recon, codebook_loss, step, last_layer=self.vqgan.last_layer, discriminator=loss_fn.discriminator,
        )
        return loss, log, recon.detach(), z_e.detach(), tokens


def train_vqgan(cfg: TrainVQGANConfig, *, resume: str = "auto", argv: list[str] | None = None) -> dict[str, Any]:
    info = dist.setup(cfg.run.device)
    try:
        return _train(cfg, info, resume, argv)
    finally:
        dist.cleanup()


def _train(cfg: TrainVQGANConfig, info: dist.DistInfo, resume: str, argv) -> dict[str, Any]:
    from ..sundae_lib import VQGAN, save_vqgan
    from ..sundae_lib.lpips import make_perceptual_loss
    from ..sundae_lib.vq_losses import VQGANLoss

    run, opt = cfg.run, cfg.optim
    device = info.device
    set_determinism(run.deterministic)
    torch.manual_seed(run.seed)
    out = Path(run.out_dir)
    ds = open_images(cfg.data, seed=run.seed)
    vq_cfg = resolve_vqgan_config(cfg.model, ds.channels)
    loss_cfg = resolve_loss_config(cfg.loss, ds.channels)
    resolved = config_to_dict(cfg)
    resolved["model"] = dataclasses.asdict(vq_cfg)
    resolved["loss"] = dataclasses.asdict(loss_cfg)
    split = make_split(ds.group_ids(), cfg.data)

    model = VQGAN(vq_cfg).to(device).train()
    perceptual = make_perceptual_loss(cfg.perceptual.lpips or None, logger, vgg=cfg.perceptual.vgg or None)
    vq_loss = VQGANLoss(loss_cfg, perceptual=perceptual, n_embed=vq_cfg.n_embed, embed_dim=vq_cfg.embed_dim).to(device)
    if "ema" in loss_cfg.codebook_remedy:  # the EMA owns the codebook: no gradient
        model.quantize.embedding.weight.requires_grad_(False)
    disc = vq_loss.discriminator
    ema = EMAWeights(model, opt.ema_decay) if opt.ema_decay > 0 else None
    objective: nn.Module = GeneratorObjective(model, vq_loss)
    disc_run: nn.Module = disc
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
        disc_run = nn.parallel.DistributedDataParallel(disc, device_ids=ids)
    amp_dtype, use_scaler = resolve_precision(run.precision, device)
    scaler_g, scaler_d = make_scaler(use_scaler, device), make_scaler(use_scaler, device)
    g_params = [p for p in model.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(g_params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=opt.disc_lr or opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)

    def factor(s: int) -> float:
        return lr_factor(s, warmup=opt.warmup_steps, schedule=opt.schedule, max_steps=run.max_steps, min_ratio=opt.min_lr_ratio)

    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)
    d_lr = opt.disc_lr or opt.lr  # set by hand each step (the discriminator starts late)
    order = BatchOrder(split.train, opt.batch_size, rank=info.rank, world_size=info.world_size, seed=run.seed)
    loader = BatchLoader(ds, order, num_workers=run.num_workers, pin_memory=device.type == "cuda")
    restart_gen = torch.Generator().manual_seed(run.seed + 7)  # same on every rank
    generators = {"restart": restart_gen}

    ckpts = CheckpointManager(out / "checkpoints", keep_last=run.keep_last, keep_best=run.keep_best, enabled=info.is_main)
    start, best = 0, None
    # rank 0 picks (and reads) the newest intact checkpoint; the others read the one it picked
    found = ckpts.open_resume(resume, read_checkpoint_files) if info.is_main else None
    resume_from = dist.broadcast_object(str(found[0]) if found is not None else None)
    if resume_from is not None:
        files = found[1] if found is not None else read_checkpoint_files(Path(resume_from))
        start, best = _load(Path(resume_from), files, model, vq_loss, ema, (opt_g, opt_d, sched_g, scaler_g, scaler_d),
                            order, generators, info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(resolved), encoding="utf-8")
        (out / "split.json").write_text(json.dumps(split.info, indent=1) + "\n", encoding="utf-8")
        (out / "run.json").write_text(json.dumps({**run_info(argv), "world_size": info.world_size}, indent=2) + "\n")
        logger.info(
            "vqgan: %.2fM parameters (+%.2fM discriminator), f=%d, %d codes; %d train / %d eval images %dx%d; "
            "batch %d x %d accum x %d ranks",
            sum(p.numel() for p in model.parameters()) / 1e6, sum(p.numel() for p in disc.parameters()) / 1e6,
            vq_cfg.downsample_factor, vq_cfg.n_embed, len(split.train), len(split.eval), *ds.size,
            opt.batch_size, opt.grad_accum, info.world_size,
        )
    metrics = MetricsLog(out, enabled=info.is_main, tensorboard=run.tensorboard)
    if start:
        metrics.truncate_after(start)
    meta = {"sundae.label_map": json.dumps(ds.label_map)} if ds.label_map else {}
    eval_model = ema.module if ema is not None else model
    preview_idx = np.concatenate([split.eval, split.train])[: run.recon_images]  # held-out first

    def write_checkpoint(step: int, eval_loss: float | None) -> None:
        rng_all = dist.gather_object(capture_rng(generators))
        if not info.is_main:
            return
        state = {
            "step": step,
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "sched_g": sched_g.state_dict(),
            "scaler_g": scaler_g.state_dict(), "scaler_d": scaler_d.state_dict(),
            "loss_state": vq_loss.training_state(),
            "ema": ema.state_dict() if ema is not None else None,
            "order": order.state_dict(), "rng": rng_all, "best": tail.best,
        }
        writers = {
            MODEL: lambda p: save_vqgan(model, p, extra_metadata=meta),
            STATE: lambda p: torch.save(state, p),
            CONFIG: lambda p: Path(p).write_text(to_toml(resolved), encoding="utf-8"),
        }
        if ema is not None:
            writers[EMA] = lambda p: save_vqgan(ema.module, p, extra_metadata=meta)
        ckpts.save(step, writers, meta={**run_info(argv), "world_size": info.world_size}, eval_loss=eval_loss)

    def evaluate(step: int) -> float:
        values = _evaluate(eval_model, vq_loss, ds, split.eval, cfg, info, device, amp_dtype)
        metrics.log(step, values)
        return values["eval/rec_loss"]

    tail = StepTail(
        run, info, has_eval=len(split.eval) > 0, evaluate=evaluate, best=best, save=write_checkpoint,
        preview=lambda step: _preview(eval_model, ds, preview_idx, out / "samples" / f"recon-{step:08d}.png", device),
    )
    step, stopped = start, None
    losses: list[float] = []
    bar = progress_bar(run, info, start, "vqgan")
    tic, seen, logs = time.perf_counter(), 0, []
    with dist.StopSignal() as stop:
        while step < run.max_steps:
            gan_on = step >= loss_cfg.disc_start and loss_cfg.disc_factor > 0 and loss_cfg.disc_weight > 0
            opt_g.zero_grad(set_to_none=True)
            pairs, step_log = [], {}
            for micro in range(opt.grad_accum):
                x, _ = next(loader)
                x = x.to(device, non_blocking=True)
                sync = objective.no_sync() if info.enabled and micro < opt.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast(device, amp_dtype):
                        loss, log, recon, z_e, tokens = objective(x, step)
                    scaler_g.scale(loss / opt.grad_accum).backward()
                pairs.append((x, recon, z_e, tokens))
                for k, v in log.items():
                    step_log[k] = step_log.get(k, 0.0) + to_float(v) / opt.grad_accum
                seen += x.shape[0]
            scaler_g.unscale_(opt_g)
            gnorm = torch.nn.utils.clip_grad_norm_(g_params, opt.grad_clip if opt.grad_clip > 0 else float("inf"))
            scaler_g.step(opt_g)
            scaler_g.update()
            sched_g.step()
            codebook = model.quantize.embedding.weight
            for _, _, z_e, tokens in pairs:
                for k, v in vq_loss.codebook_step(codebook, z_e, tokens, generator=restart_gen).items():
                    step_log[k] = step_log.get(k, 0.0) + to_float(v) / len(pairs)
            if gan_on:
                for group in opt_d.param_groups:
                    group["lr"] = d_lr * factor(step)
                opt_d.zero_grad(set_to_none=True)
                for micro, (x, recon, _, _) in enumerate(pairs):
                    sync = disc_run.no_sync() if info.enabled and micro < len(pairs) - 1 else contextlib.nullcontext()
                    with sync:
                        with autocast(device, amp_dtype):
                            d_loss, dlog = vq_loss.discriminator_step(x, recon, step, discriminator=disc_run)
                        scaler_d.scale(d_loss / opt.grad_accum).backward()
                    for k, v in dlog.items():
                        step_log[k] = step_log.get(k, 0.0) + to_float(v) / len(pairs)
                scaler_d.unscale_(opt_d)
                if opt.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), opt.grad_clip)
                scaler_d.step(opt_d)
                scaler_d.update()
            if ema is not None:
                ema.update(model)
            step += 1
            losses.append(step_log.get("train/total_loss", 0.0))
            logs.append(step_log)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rec=f"{step_log.get('train/rec_loss', 0.0):.4f}",
                                img_s=f"{seen * info.world_size / max(1e-9, time.perf_counter() - tic):.1f}")
            if run.log_every and step % run.log_every == 0:
                keys = sorted(logs[-1])
                means = dist.all_mean([float(np.mean([entry.get(k, 0.0) for entry in logs])) for k in keys])
                values = dict(zip(keys, means, strict=True))
                values.update({"train/lr": sched_g.get_last_lr()[0], "train/grad_norm": float(gnorm),
                               "train/images_per_s": seen * info.world_size / max(1e-9, time.perf_counter() - tic)})
                metrics.log(step, values)
                logs, tic, seen = [], time.perf_counter(), 0
            if tail(step, stop):
                stopped = stop.received
                break
    if bar is not None:
        bar.close()
    metrics.close()
    export = None
    if stopped is None and info.is_main:
        export = out / run.export
        with disk_full_as_one_line(f"the final model {export.name}", out):
            save_vqgan(ema.module if ema is not None else model, export, extra_metadata=meta)
        logger.info("saved the final VQ-GAN to %s", export)
    dist.barrier()
    return {"step": step, "stopped": stopped, "export": str(export) if export else None, "losses": losses,
            "best": tail.best, "model": model, "out_dir": str(out)}


def _load(folder: Path, files, model, vq_loss, ema, optim_parts, order, generators, info) -> tuple[int, Any]:
    from ..sundae_lib._helpers import load_state_dict_strict

    opt_g, opt_d, sched_g, scaler_g, scaler_d = optim_parts
    weights, state = files
    load_state_dict_strict(
        model, weights,
        what=f"checkpoint {folder} (saved by a run with another [model] config? use --resume never or a new --out)",
    )
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    sched_g.load_state_dict(state["sched_g"])
    scaler_g.load_state_dict(state["scaler_g"])
    scaler_d.load_state_dict(state["scaler_d"])
    vq_loss.load_training_state({k: v.to(next(model.parameters()).device) for k, v in state["loss_state"].items()})
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    order.load_state_dict(state["order"])
    if len(state["rng"]) == info.world_size:
        restore_rng(state["rng"][info.rank], generators)
    if info.is_main:
        logger.info("resumed from %s at step %d", folder, int(state["step"]))
    return int(state["step"]), (tuple(state["best"]) if state.get("best") else None)


@torch.no_grad()
def _evaluate(model, vq_loss, ds, eval_items, cfg: TrainVQGANConfig, info, device, amp_dtype) -> dict[str, float]:
    """Held-out reconstruction L1 (+ LPIPS when loaded), codebook usage and perplexity."""
    from ..sundae_lib.vq_losses import codebook_usage, perplexity, reconstruction_loss

    was = model.training
    model.eval()
    mine = eval_items[info.rank :: info.world_size]
    bs = cfg.optim.batch_size
    batches = [mine[i : i + bs] for i in range(0, len(mine), bs)]
    if cfg.run.eval_batches:
        batches = batches[: cfg.run.eval_batches]
    rec, lp, n, all_tokens = 0.0, 0.0, 0, []
    for idx in batches:
        x, _ = ds.get_batch(idx, 0)
        x = x.to(device)
        with autocast(device, amp_dtype):
            out = model(x)
        rec += float(reconstruction_loss(x, out.recon.float(), kind="l1")) * len(idx)
        if vq_loss.perceptual is not None:
            lp += float(vq_loss.perceptual(x, out.recon.float()).mean()) * len(idx)
        n += len(idx)
        all_tokens.append(out.tokens)
    model.train(was)
    k = model.codebook_size
    tokens = torch.cat(all_tokens) if all_tokens else torch.zeros(0, 1, 1, dtype=torch.long, device=device)
    usage = float(codebook_usage(tokens, k)) if len(tokens) else 0.0
    ppl = float(perplexity(tokens, k)) if len(tokens) else 0.0
    rec_s, lp_s, n_s, usage, ppl = dist.all_mean([rec, lp, float(n), usage, ppl])
    values = {"eval/rec_loss": rec_s / max(n_s, 1e-9), "eval/codebook_usage": usage, "eval/perplexity": ppl}
    if vq_loss.perceptual is not None:
        values["eval/p_loss"] = lp_s / max(n_s, 1e-9)
    return values


@torch.no_grad()
def _preview(model, ds, idx, path: Path, device) -> None:
    """Originals (top row) over reconstructions (bottom row)."""
    was = model.training
    model.eval()
    x, _ = ds.get_batch(idx, 0)
    x = x.to(device)
    recon = model.decode(model.encode(x))[..., : x.shape[-2], : x.shape[-1]]
    model.train(was)
    save_grid(torch.cat([x, recon.float()]), path, nrow=len(x))
