"""Pieces every training loop shares: precision and autocast, learning-rate schedule, EMA
weights, RNG state capture, metrics (JSONL + optional TensorBoard), PNG grids, run metadata.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None for fp32, use GradScaler)``.

    ``auto``: ``sundae_lib.preferred_dtype(device)`` — bf16 on GPUs with native bf16, fp16 +
    GradScaler on older GPUs, bf16 on CPUs with AMX / AVX512-BF16 that a one-time measurement
    confirms faster, fp32 (no autocast) elsewhere."""
    from ..sundae_lib.dtypes import cpu_has_fast_bf16, dtype_name, preferred_dtype

    asked = name
    if name == "auto":
        if device.type not in ("cuda", "cpu"):
            return None, False
        if device.type == "cpu" and dist.running():
            # rank 0 measures and everyone follows: ranks timing bf16 while competing for the
            # same cores could otherwise disagree near the threshold
            mine = dtype_name(preferred_dtype(device)) if torch.distributed.get_rank() == 0 else None
            name = dist.broadcast_object(mine)
        else:
            name = dtype_name(preferred_dtype(device))
    if name == "fp32":
        return None, False
    if name == "bf16":
        if asked == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
            logger.warning("bf16 autocast on this CPU: slower than fp32 without AMX / AVX512-BF16 "
                           "(see `sundae-train env`); use precision 'auto' or 'fp32'")
        elif device.type == "cuda" and not torch.cuda.is_bf16_supported():  # emulated bf16 is allowed when asked
            raise ValueError("precision 'bf16' was asked for but this GPU lacks bf16; use 'fp16' or 'auto'")
        return torch.bfloat16, False
    if name == "fp16":
        return torch.float16, device.type == "cuda"
    raise ValueError(f"precision {name!r} is not one of auto, fp32, bf16, fp16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(enabled: bool, device: torch.device):
    return torch.amp.GradScaler(device.type, enabled=enabled)


# ----------------------------------------------------------------------------------------------
# schedule, EMA, determinism, RNG
# ----------------------------------------------------------------------------------------------


def lr_factor(step: int, *, warmup: int, schedule: str, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based): linear warmup over
    ``warmup`` steps, then constant, or cosine down to ``min_ratio`` at ``max_steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers, kept as a
    separate module (``self.module``) so it can be evaluated, sampled and saved directly.
    Effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = model.state_dict()
        for key, value in self.module.state_dict().items():
            new = src[key]
            if value.is_floating_point():
                value.mul_(d).add_(new.detach().to(value.dtype), alpha=1 - d)
            else:
                value.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"], strict=True)


def set_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {name: g.get_state() for name, g in generators.items()}
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])


# ----------------------------------------------------------------------------------------------
# metrics and previews
# ----------------------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL metrics (``metrics.jsonl``) plus TensorBoard when it is installed.
    Rank 0 only: other ranks get a disabled instance."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.writer = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (float(v) if not isinstance(v, str) else v) for k, v in values.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records newer than the checkpoint (they will be recomputed)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepTail:
    """The end of every optimizer step, shared by the prior and VQ-GAN trainers: evaluation (and
    the best score so far), the checkpoint, the preview and stop requests, in that order. The
    checkpoint comes before the preview and a failing preview is logged, never fatal: a preview
    must not be able to lose the step's checkpoint or stop the run (a run that died at every
    preview could never get past it by resuming).

    ``evaluate(step) -> score`` (lower is better; it logs its own metrics), ``preview(step)``
    (main rank only) and ``save(step, score_or_None)`` are the trainer's; ``best`` is
    ``(step, score)`` restored from a checkpoint or ``None``."""

    def __init__(self, run, info, *, has_eval: bool, evaluate, preview, save, best=None):
        self.run, self.info, self.has_eval = run, info, has_eval
        self.evaluate, self.preview, self.save = evaluate, preview, save
        self.best: tuple[int, float] | None = best
        self.last_eval: tuple[int, float] | None = None

    def __call__(self, step: int, stop) -> bool:
        """Run the tail after ``step``; True when the loop must stop (a signal on any rank)."""
        run = self.run
        last = step == run.max_steps
        want_stop = dist.any_rank(stop.requested)
        want_ckpt = want_stop or last or bool(run.checkpoint_every and step % run.checkpoint_every == 0)
        if run.eval_every and self.has_eval and (step % run.eval_every == 0 or (want_ckpt and run.keep_best)):
            if self.last_eval is None or self.last_eval[0] != step:
                self.last_eval = (step, self.evaluate(step))
                if self.best is None or self.last_eval[1] < self.best[1]:
                    self.best = self.last_eval
        if want_ckpt:
            self.save(step, self.last_eval[1] if self.last_eval and self.last_eval[0] == step else None)
            dist.barrier()
        if (run.sample_every and step % run.sample_every == 0) or last:
            if self.info.is_main:
                try:
                    self.preview(step)
                except Exception as exc:  # a preview is a by-product: log it, keep training
                    logger.warning("preview at step %d failed (%s: %s); training goes on", step,
                                   type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            dist.barrier()
        return want_stop


def progress_bar(run, info, start: int, desc: str):
    """A tqdm bar on rank 0 (None elsewhere or with run.progress off)."""
    if not (run.progress and info.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=run.max_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)


def save_grid(images: torch.Tensor, path: Path, *, nrow: int | None = None) -> Path:
    """Images ``[b, c, H, W]`` in [-1, 1] -> one PNG grid (2 px gaps), written atomically. A
    single image is written as it is (no frame), so it can be fed back, e.g. to ``inpaint``."""
    from PIL import Image

    from ..sundae_lib._helpers import atomic_write

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    pad = 2 if b > 1 else 0
    canvas = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr[:, :, :3])
    buf = io.BytesIO()
    img.save(buf, format="PNG")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())

    return atomic_write(path, write)


def save_images(images: torch.Tensor, folder: Path, *, prefix: str = "", start: int = 0) -> list[Path]:
    """One PNG per image (``{prefix}{index:05d}.png``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    paths = []
    for i, img in enumerate(x):
        arr = img.permute(1, 2, 0).numpy()
        p = folder / f"{prefix}{start + i:05d}.png"
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]).save(p)
        paths.append(p)
    return paths


def run_info(argv: list[str] | None) -> dict[str, Any]:
    from .. import __version__

    return {
        "argv": list(argv) if argv is not None else list(sys.argv),
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
    }


def to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    if isinstance(value, np.generic):
        return float(value)
    return float(value)
