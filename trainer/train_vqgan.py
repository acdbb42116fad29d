"""``sundae-train vqgan``: train a VQ-GAN codec with ``sundae_lib.vq_losses.VQGANLoss``.

Per optimizer step: generator micro-batches (reconstruction L1 [+ LPIPS] + adaptive GAN term once
``loss.disc_start`` is reached + codebook/commitment), one generator update, the codebook remedy
(EMA / dead-code restart) and, from ``disc_start`` on, discriminator micro-batches on the
detached reconstructions with the discriminator's own optimizer. The generator objective runs
inside one DDP-wrapped module (encode, quantize, decode, loss); the discriminator is wrapped
separately and only the bare, frozen copy is used in the generator step. :func:`train_vqgan` runs
:class:`VQGANTrainee` in the shared loop (``trainer/loop.py``: resume, run folder, checkpoints,
eval, previews, export).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import dist, loop
from .config import ConfigError, TrainVQGANConfig, config_to_dict, validate_model_table
from .data import make_split, open_images
from .runtime import EMA as EMAWeights
from .runtime import autocast, make_scaler, resolve_precision, save_grid, to_float

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
    """Train a VQ-GAN as ``cfg`` says (see :func:`~.loop.run_training` for the summary dict)."""
    return loop.run_training(cfg, VQGANTrainee, resume=resume, argv=argv)


class VQGANTrainee:
    """A VQ-GAN for :func:`~.loop.run_training`: the generator objective in one DDP-wrapped
    module, the discriminator (wrapped apart) with its own optimizer and loss scale, the
    codebook remedy's restart generator (the same on every rank), native VQ-GAN files."""

    names = loop.Names("vqgan", "VQ-GAN", preview="recon-", loss="train/total_loss",
                       postfix=("rec", "train/rec_loss"), score="eval/rec_loss")

    def __init__(self, cfg: TrainVQGANConfig, info: dist.DistInfo) -> None:
        from ..sundae_lib import VQGAN
        from ..sundae_lib.lpips import make_perceptual_loss
        from ..sundae_lib.vq_losses import VQGANLoss

        run, opt = cfg.run, cfg.optim
        device = info.device
        self.cfg, self.info, self.device = cfg, info, device
        self.ds = ds = open_images(cfg.data, seed=run.seed)
        self.vq_cfg = vq_cfg = resolve_vqgan_config(cfg.model, ds.channels)
        self.loss_cfg = loss_cfg = resolve_loss_config(cfg.loss, ds.channels)
        self.resolved = config_to_dict(cfg)
        self.resolved["model"] = dataclasses.asdict(vq_cfg)
        self.resolved["loss"] = dataclasses.asdict(loss_cfg)
        self.split = make_split(ds.group_ids(), cfg.data)

        self.model = model = VQGAN(vq_cfg).to(device).train()
        perceptual = make_perceptual_loss(cfg.perceptual.lpips or None, logger, vgg=cfg.perceptual.vgg or None)
        self.vq_loss = VQGANLoss(loss_cfg, perceptual=perceptual, n_embed=vq_cfg.n_embed, embed_dim=vq_cfg.embed_dim).to(device)
        if "ema" in loss_cfg.codebook_remedy:  # the EMA owns the codebook: no gradient
            model.quantize.embedding.weight.requires_grad_(False)
        self.disc = disc = self.vq_loss.discriminator
        self.ema = EMAWeights(model, opt.ema_decay) if opt.ema_decay > 0 else None
        self.objective = loop.ddp_wrap(GeneratorObjective(model, self.vq_loss), info)
        self.disc_run = loop.ddp_wrap(disc, info)
        self.amp_dtype, use_scaler = resolve_precision(run.precision, device)
        self.scaler_g, self.scaler_d = make_scaler(use_scaler, device), make_scaler(use_scaler, device)
        self.g_params = [p for p in model.parameters() if p.requires_grad]
        self.opt_g = torch.optim.AdamW(self.g_params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        self.opt_d = torch.optim.AdamW(disc.parameters(), lr=opt.disc_lr or opt.lr, betas=opt.betas, eps=opt.eps,
                                       weight_decay=opt.weight_decay)
        self.factor = loop.lr_schedule(cfg)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, self.factor)
        self.d_lr = opt.disc_lr or opt.lr  # set by hand each step (the discriminator starts late)
        self.order, self.loader = loop.batch_stream(ds, self.split.train, cfg, info)
        self.restart_gen = torch.Generator().manual_seed(run.seed + 7)  # same on every rank
        self.generators = {"restart": self.restart_gen}
        self.meta = {"sundae.label_map": json.dumps(ds.label_map)} if ds.label_map else {}
        self.preview_idx = np.concatenate([self.split.eval, self.split.train])[: run.recon_images]  # held-out first

    def log_summary(self) -> None:
        cfg, split = self.cfg, self.split
        logger.info(
            "vqgan: %.2fM parameters (+%.2fM discriminator), f=%d, %d codes; %d train / %d eval images %dx%d; "
            "batch %d x %d accum x %d ranks",
            sum(p.numel() for p in self.model.parameters()) / 1e6, sum(p.numel() for p in self.disc.parameters()) / 1e6,
            self.vq_cfg.downsample_factor, self.vq_cfg.n_embed, len(split.train), len(split.eval), *self.ds.size,
            cfg.optim.batch_size, cfg.optim.grad_accum, self.info.world_size,
        )

    def train_step(self, step: int) -> loop.StepLog:
        """Generator micro-batches and update, the codebook remedy, then (from disc_start on) the
        discriminator on the detached reconstructions."""
        opt, loss_cfg, device = self.cfg.optim, self.loss_cfg, self.device
        self.opt_g.zero_grad(set_to_none=True)
        pairs, step_log, seen = [], {}, 0
        for micro in range(opt.grad_accum):
            x, _ = next(self.loader)
            x = x.to(device, non_blocking=True)
            with loop.accumulation_sync(self.objective, self.info, micro, opt.grad_accum):
                with autocast(device, self.amp_dtype):
                    loss, log, recon, z_e, tokens = self.objective(x, step)
                self.scaler_g.scale(loss / opt.grad_accum).backward()
            pairs.append((x, recon, z_e, tokens))
            _add_means(step_log, log, opt.grad_accum)
            seen += x.shape[0]
        gnorm = loop.optimizer_step(self.scaler_g, self.opt_g, self.g_params, opt.grad_clip)
        self.sched_g.step()
        codebook = self.model.quantize.embedding.weight
        for _, _, z_e, tokens in pairs:
            _add_means(step_log, self.vq_loss.codebook_step(codebook, z_e, tokens, generator=self.restart_gen), len(pairs))
        if step >= loss_cfg.disc_start and loss_cfg.disc_factor > 0 and loss_cfg.disc_weight > 0:
            for group in self.opt_d.param_groups:
                group["lr"] = self.d_lr * self.factor(step)
            self.opt_d.zero_grad(set_to_none=True)
            for micro, (x, recon, _, _) in enumerate(pairs):
                with loop.accumulation_sync(self.disc_run, self.info, micro, len(pairs)):
                    with autocast(device, self.amp_dtype):
                        d_loss, dlog = self.vq_loss.discriminator_step(x, recon, step, discriminator=self.disc_run)
                    self.scaler_d.scale(d_loss / opt.grad_accum).backward()
                _add_means(step_log, dlog, len(pairs))
            loop.optimizer_step(self.scaler_d, self.opt_d, self.disc.parameters(), opt.grad_clip, measure=False)
        return loop.StepLog(step_log, gnorm, seen)

    def lr(self) -> float:
        return self.sched_g.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "scaler_g": self.scaler_g.state_dict(), "scaler_d": self.scaler_d.state_dict(),
            "loss_state": self.vq_loss.training_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.vq_loss.load_training_state({k: v.to(self.device) for k, v in state["loss_state"].items()})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return _evaluate(model, self.vq_loss, self.ds, self.split.eval, self.cfg, self.info, self.device, self.amp_dtype)

    def preview(self, model: nn.Module, path: Path) -> None:
        _preview(model, self.ds, self.preview_idx, path, self.device)

    def save_model(self, model: nn.Module, path: str | Path, step: int) -> None:
        from ..sundae_lib import save_vqgan

        save_vqgan(model, path, extra_metadata=self.meta)


def _add_means(total: dict[str, float], values: dict[str, Any], count: int) -> None:
    """``total[k] += values[k] / count``: a step's log as means over its micro-batches."""
    for k, v in values.items():
        total[k] = total.get(k, 0.0) + to_float(v) / count


@torch.no_grad()
def _evaluate(model, vq_loss, ds, eval_items, cfg: TrainVQGANConfig, info, device, amp_dtype) -> dict[str, float]:
    """Held-out reconstruction L1 (+ LPIPS when loaded), codebook usage and perplexity."""
    from ..sundae_lib.vq_losses import codebook_usage, perplexity, reconstruction_loss

    rec, lp, n, all_tokens = 0.0, 0.0, 0, []
    with loop.evaluating(model):
        for idx in loop.eval_batches(eval_items, cfg, info):
            x, _ = ds.get_batch(idx, 0)
            x = x.to(device)
            with autocast(device, amp_dtype):
                out = model(x)
            rec += float(reconstruction_loss(x, out.recon.float(), kind="l1")) * len(idx)
            if vq_loss.perceptual is not None:
                lp += float(vq_loss.perceptual(x, out.recon.float()).mean()) * len(idx)
            n += len(idx)
            all_tokens.append(out.tokens)
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
    x, _ = ds.get_batch(idx, 0)
    x = x.to(device)
    with loop.evaluating(model):
        recon = model.decode(model.encode(x))[..., : x.shape[-2], : x.shape[-1]]
    save_grid(torch.cat([x, recon.float()]), path, nrow=len(x))
