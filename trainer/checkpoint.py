"""Checkpoint folders: atomic, prunable, resumable.

Layout under ``<out_dir>/checkpoints/``::

    step-00001000/
        model.safetensors        native model file (loadable by load_prior / load_vqgan)
        ema.safetensors          EMA weights as a native model file (priors with EMA on)
        training_state.pt        optimizer, scheduler, scaler, EMA, step, RNG states (per rank),
                                 data order position, best eval loss (torch.load weights_only)
        config.toml              the resolved training config (usable as --config)
        checkpoint.json          step, eval loss, file sizes, argv, version: written LAST
    step-00002000/
    latest.json                  {"step": ..., "folder": ...} (informational)
    best.json                    the step with the lowest eval loss

A checkpoint is written into a hidden ``.step-XXXXXXXX.partial-<pid>`` folder, each file through
``atomic_write``, ``checkpoint.json`` last, then the folder is renamed into place. A crash at any
point leaves either no new folder or a complete one; :meth:`CheckpointManager.latest` only ever
returns folders whose ``checkpoint.json`` lists files that exist with the recorded sizes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d{8,})$")
META = "checkpoint.json"
STATE = "training_state.pt"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
CONFIG = "config.toml"


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


def _write_json(path: Path, obj: Any) -> None:
    from ..sundae_lib._helpers import atomic_write

    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def read_checkpoint_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's ``checkpoint.json`` if the checkpoint is complete, else ``None``."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not meta.get("complete"):
        return None
    for name, size in meta.get("files", {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            return None
    return meta


class CheckpointManager:
    """Writes, lists, prunes and finds checkpoints under ``root``. Only rank 0 writes."""

    def __init__(self, root: Path, *, keep_last: int = 3, keep_best: bool = True, enabled: bool = True) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.enabled = enabled

    # ---- discovery ----
    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and read_checkpoint_meta(p) is not None:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (highest step), or ``None``."""
        found = self.complete_checkpoints()
        return found[-1][1] if found else None

    def best(self) -> tuple[int, float] | None:
        try:
            data = json.loads((self.root / "best.json").read_text(encoding="utf-8"))
            return int(data["step"]), float(data["eval_loss"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None

    def resolve_resume(self, spec: str) -> Path | None:
        """``--resume``: ``never`` -> None; ``auto`` -> latest complete checkpoint or None;
        a path -> that checkpoint folder (which must be complete)."""
        if spec == "never":
            return None
        if spec == "auto":
            found = self.latest()
            if found is not None:
                logger.info("resuming from %s", found)
            return found
        path = Path(spec).expanduser()
        if path.is_dir() and read_checkpoint_meta(path) is None and (path / "checkpoints").is_dir():
            return CheckpointManager(path / "checkpoints").resolve_resume("auto") or _no_ckpt(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume {spec!r}: no such checkpoint folder; give a step-XXXXXXXX folder, a run "
                "folder, 'auto' (latest in run.out_dir) or 'never'"
            )
        if read_checkpoint_meta(path) is None:
            raise ValueError(
                f"--resume {spec!r} is not a complete checkpoint (no valid {META}; the save was "
                "probably interrupted); pick an earlier step folder or use --resume auto"
            )
        return path

    # ---- writing ----
    def save(
        self,
        step: int,
        writers: dict[str, Callable[[str], None]],
        *,
        meta: dict[str, Any],
        eval_loss: float | None = None,
    ) -> Path | None:
        """Write one checkpoint: ``writers[name](tmp_path)`` fills each file. Returns the folder."""
        if not self.enabled:
            return None
        from ..sundae_lib._helpers import atomic_write

        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".step-*.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.root / step_folder_name(step)
        tmp = self.root / f".{final.name}.partial-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            sizes = {}
            for name, write in writers.items():
                atomic_write(tmp / name, write)
                sizes[name] = (tmp / name).stat().st_size
            record = {**meta, "step": step, "eval_loss": eval_loss, "files": sizes, "complete": True}
            _write_json(tmp / META, record)
            if final.exists():  # re-saving a step (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _write_json(self.root / "latest.json", {"step": step, "folder": final.name})
        if eval_loss is not None:
            best = self.best()
            if best is None or eval_loss < best[1] or best[0] == step:
                _write_json(self.root / "best.json", {"step": step, "folder": final.name, "eval_loss": eval_loss})
        self.prune()
        logger.info("checkpoint saved: %s", final)
        return final

    def prune(self) -> None:
        found = self.complete_checkpoints()
        keep = {p for _, p in found[-self.keep_last :]}
        best = self.best() if self.keep_best else None
        if best is not None:
            keep.add(self.root / step_folder_name(best[0]))
        for _, p in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _no_ckpt(path: Path) -> Path:
    raise FileNotFoundError(f"--resume {str(path)!r}: the run folder has no complete checkpoint yet")
