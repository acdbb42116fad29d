"""The training-loop scaffold that ``sundae-train prior`` and ``sundae-train vqgan`` plug into.

:func:`run_training` owns what every training run does, whatever it trains:

- the process group (``torchrun`` / DDP or one process), determinism and the initial seed;
- resuming: rank 0 picks and reads the newest intact checkpoint (``--resume auto``, a damaged one
  moved aside), an explicit ``step-N`` or folder, or none; the other ranks read the one it picked;
  weights, optimizer states, EMA, data position, per-rank RNG streams and the best score return;
- the run folder (rank 0): ``config.toml``, ``split.json``, ``run.json``, ``metrics.jsonl``
  (records after the resumed step dropped), ``samples/``, ``checkpoints/``;
- the loop: one optimizer step, EMA update, progress bar, train metrics every ``log_every``
  steps (means over the steps since the last record, averaged over ranks), then
  :class:`~.runtime.StepTail` (evaluation, the atomic checkpoint, the preview, SIGINT / SIGTERM);
- the final export of the EMA (else raw) weights, unless a signal stopped the run.

What is trained is a :class:`Trainee`: it builds its data, model(s) and optimizers, and runs one
optimizer step, an evaluation, a preview, and writes its model file. The pieces both trainees use
inside a step (DDP wrapping, gradient accumulation without needless all-reduces, the scaled
optimizer step, the eval shards) are at the end of this file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

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
from .config import to_toml
from .data import BatchLoader, BatchOrder, Split
from .runtime import EMA as EMAWeights
from .runtime import (
    MetricsLog,
    StepTail,
    capture_rng,
    lr_factor,
    progress_bar,
    restore_rng,
    run_info,
    set_determinism,
)

logger = logging.getLogger(__name__)


class StepLog(NamedTuple):
    """What one optimizer step reports: ``log`` = metric name -> value (means over the
    micro-batches), the generator's gradient norm before clipping, the images this rank used."""

    log: dict[str, float]
    grad_norm: float | torch.Tensor
    images: int


class Names(NamedTuple):
    """How the loop names and reads a trainee's run."""

    bar: str  # progress-bar label ("prior", "vqgan")
    model: str  # what the export log line calls the model ("prior", "VQ-GAN")
    preview: str  # preview file name before the step number ("step-", "recon-")
    loss: str  # the step-log entry collected in the result's ``losses``
    postfix: tuple[str, str]  # (progress-bar postfix field, step-log entry it shows)
    score: str  # the eval metric that ranks checkpoints (lower is better)


class Trainee(Protocol):
    """What a trainer plugs into :func:`run_training`. Built by ``build(cfg, info)`` after the
    seed is set; it must not touch the run folder (rank 0's loop writes it)."""

    names: Names
    model: nn.Module  # the trained, unwrapped model: checkpoint weights and resume target
    ema: EMAWeights | None  # EMA weights, evaluated, previewed and exported when present
    order: BatchOrder  # the data position (saved, restored)
    generators: dict[str, torch.Generator]  # RNG streams saved per rank
    resolved: dict[str, Any]  # the resolved config (config.toml, usable as --config)
    split: Split  # split.json; ``split.eval`` empty = no evaluation

    def log_summary(self) -> None:
        """One log line on rank 0 describing the model, the data and the batch."""

    def train_step(self, step: int) -> StepLog:
        """One optimizer step (all micro-batches) after ``step`` completed steps; no EMA update."""

    def lr(self) -> float:
        """The learning rate the last step used (metrics)."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizers, schedulers, scalers and the like (not step, EMA, order, RNG, best)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave from a checkpoint's training state."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics of ``model`` (EMA or raw), the same on every rank; includes names.score."""

    def preview(self, model: nn.Module, path: Path) -> None:
        """Write a preview PNG of ``model`` to ``path`` (rank 0 only; a failure is logged)."""

    def save_model(self, model: nn.Module, path: str | Path, step: int) -> None:
        """Write ``model`` as a native model file (checkpoint and export)."""


def run_training(cfg: Any, build: Callable[[Any, dist.DistInfo], Trainee], *, resume: str = "auto",
                 argv: list[str] | None = None) -> dict[str, Any]:
    """Train what ``build(cfg, info)`` returns as ``cfg.run`` says, on one process or under
    ``torchrun``. Returns ``step``, ``stopped`` (the signal number or None), ``export`` (the
    final model file or None), ``losses`` (this rank's, one a step), ``best`` ((step, score) or
    None), ``model`` (the trained unwrapped model, every rank), ``ema`` and ``out_dir``."""
    info = dist.setup(cfg.run.device)
    try:
        set_determinism(cfg.run.deterministic)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        return _fit(build(cfg, info), cfg.run, info, resume, argv)
    finally:
        dist.cleanup()


def _fit(t: Trainee, run: Any, info: dist.DistInfo, resume: str, argv: list[str] | None) -> dict[str, Any]:
    out = Path(run.out_dir)
    ckpts = CheckpointManager(out / "checkpoints", keep_last=run.keep_last, keep_best=run.keep_best, enabled=info.is_main)
    start, best = _resume(t, ckpts, resume, info)

    def run_meta() -> dict[str, Any]:
        return {**run_info(argv), "world_size": info.world_size}

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(t.resolved), encoding="utf-8")
        (out / "split.json").write_text(json.dumps(t.split.info, indent=1) + "\n", encoding="utf-8")
        (out / "run.json").write_text(json.dumps(run_meta(), indent=2) + "\n")
        t.log_summary()
    metrics = MetricsLog(out, enabled=info.is_main, tensorboard=run.tensorboard)
    if start:
        metrics.truncate_after(start)
    eval_model = t.ema.module if t.ema is not None else t.model

    def save(step: int, eval_loss: float | None) -> None:
        rng_all = dist.gather_object(capture_rng(t.generators))
        if not info.is_main:
            return
        state = {
            "step": step,
            **t.state_dict(),
            "ema": t.ema.state_dict() if t.ema is not None else None,
            "order": t.order.state_dict(),
            "rng": rng_all,
            "best": tail.best,
        }
        writers = {
            MODEL: lambda p: t.save_model(t.model, p, step),
            STATE: lambda p: torch.save(state, p),
            CONFIG: lambda p: Path(p).write_text(to_toml(t.resolved), encoding="utf-8"),
        }
        if t.ema is not None:
            writers[EMA] = lambda p: t.save_model(t.ema.module, p, step)
        ckpts.save(step, writers, meta=run_meta(), eval_loss=eval_loss)

    def evaluate(step: int) -> float:
        values = t.evaluate(eval_model)
        metrics.log(step, values)
        return values[t.names.score]

    tail = StepTail(
        run, info, has_eval=len(t.split.eval) > 0, evaluate=evaluate, best=best, save=save,
        preview=lambda step: t.preview(eval_model, out / "samples" / f"{t.names.preview}{step:08d}.png"),
    )
    step, stopped = start, None
    losses: list[float] = []
    bar = progress_bar(run, info, start, t.names.bar)
    tic, seen, logs = time.perf_counter(), 0, []
    with dist.StopSignal() as stop:
        while step < run.max_steps:
            log, grad_norm, images = t.train_step(step)
            if t.ema is not None:
                t.ema.update(t.model)
            step += 1
            seen += images
            losses.append(log.get(t.names.loss, 0.0))
            logs.append(log)
            if bar is not None:
                field, key = t.names.postfix
                bar.update(1)
                bar.set_postfix({field: f"{log.get(key, 0.0):.4f}",
                                 "img_s": f"{seen * info.world_size / max(1e-9, time.perf_counter() - tic):.1f}"})
            if run.log_every and step % run.log_every == 0:
                keys = sorted(logs[-1])
                means = dist.all_mean([float(np.mean([entry.get(k, 0.0) for entry in logs])) for k in keys])
                values = dict(zip(keys, means, strict=True))
                values.update({"train/lr": t.lr(), "train/grad_norm": float(grad_norm),
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
            t.save_model(eval_model, export, step)
        logger.info("saved the final %s (%s weights) to %s", t.names.model, "EMA" if t.ema is not None else "raw", export)
    dist.barrier()
    return {
        "step": step,
        "stopped": stopped,
        "export": str(export) if export else None,
        "losses": losses,
        "best": tail.best,
        "model": t.model,
        "ema": t.ema.module if t.ema is not None else None,
        "out_dir": str(out),
    }


def _resume(t: Trainee, ckpts: CheckpointManager, spec: str, info: dist.DistInfo) -> tuple[int, tuple[int, float] | None]:
    """``(step, best)`` of the checkpoint ``spec`` picks, loaded into ``t``; ``(0, None)`` fresh."""
    from ..sundae_lib._helpers import load_state_dict_strict

    # rank 0 picks (and reads) the newest intact checkpoint; the others read the one it picked
    found = ckpts.open_resume(spec, read_checkpoint_files) if info.is_main else None
    picked = dist.broadcast_object(str(found[0]) if found is not None else None)
    if picked is None:
        return 0, None
    folder = Path(picked)
    weights, state = found[1] if found is not None else read_checkpoint_files(folder)
    load_state_dict_strict(
        t.model, weights,
        what=f"checkpoint {folder} (saved by a run with another [model] config? use --resume never or a new --out)",
    )
    t.load_state_dict(state)
    if t.ema is not None:
        if state.get("ema") is None:
            logger.warning("the checkpoint has no EMA weights: EMA restarts from the current weights")
            t.ema.module.load_state_dict(t.model.state_dict())
        else:
            t.ema.load_state_dict(state["ema"])
    t.order.load_state_dict(state["order"])
    rng = state["rng"]
    if len(rng) == info.world_size:
        restore_rng(rng[info.rank], t.generators)
    else:
        logger.warning("checkpoint saved on %d rank(s), resuming on %d: RNG streams are reseeded", len(rng), info.world_size)
    step = int(state["step"])
    if info.is_main:
        logger.info("resumed from %s at step %d", folder, step)
    return step, (tuple(state["best"]) if state.get("best") else None)


# ----------------------------------------------------------------------------------------------
# pieces a trainee uses
# ----------------------------------------------------------------------------------------------


def batch_stream(dataset: Any, items: np.ndarray, cfg: Any, info: dist.DistInfo) -> tuple[BatchOrder, BatchLoader]:
    """This rank's shard of an endless, seeded, resumable batch order over ``items``, and the
    loader that reads it (``next(loader) -> (x, y)``)."""
    order = BatchOrder(items, cfg.optim.batch_size, rank=info.rank, world_size=info.world_size, seed=cfg.run.seed)
    loader = BatchLoader(dataset, order, num_workers=cfg.run.num_workers, pin_memory=info.device.type == "cuda")
    return order, loader


def lr_schedule(cfg: Any) -> Callable[[int], float]:
    """``step -> LR multiplier`` of ``cfg.optim`` (warmup, then constant or cosine to max_steps)."""
    opt = cfg.optim

    def factor(step: int) -> float:
        return lr_factor(step, warmup=opt.warmup_steps, schedule=opt.schedule, max_steps=cfg.run.max_steps,
                         min_ratio=opt.min_lr_ratio)

    return factor


def ddp_wrap(module: nn.Module, info: dist.DistInfo) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` under ``torchrun``; itself on one process."""
    if not info.enabled:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def accumulation_sync(module: nn.Module, info: dist.DistInfo, micro: int, count: int):
    """The context for micro-batch ``micro`` of ``count``: DDP's ``no_sync`` (gradients kept
    local) for all but the last, whose backward all-reduces the accumulated gradients."""
    if info.enabled and micro < count - 1:
        return module.no_sync()
    return contextlib.nullcontext()


def optimizer_step(scaler: Any, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], grad_clip: float,
                   *, measure: bool = True) -> torch.Tensor | None:
    """Unscale the gradients, clip their norm to ``grad_clip`` (0 = no clipping), step, update
    the loss scale. Returns the norm before clipping (``None`` when ``measure`` is off and
    nothing is clipped: the norm is not computed)."""
    scaler.unscale_(optimizer)
    norm = None
    if measure or grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    return norm


def eval_batches(items: np.ndarray, cfg: Any, info: dist.DistInfo) -> list[np.ndarray]:
    """This rank's share of the held-out ``items`` (every world_size-th from its rank) in
    batches of ``optim.batch_size``, at most ``run.eval_batches`` of them (0 = all)."""
    mine = items[info.rank :: info.world_size]
    bs = cfg.optim.batch_size
    batches = [mine[i : i + bs] for i in range(0, len(mine), bs)]
    return batches[: cfg.run.eval_batches] if cfg.run.eval_batches else batches


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, back in the mode it had afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
