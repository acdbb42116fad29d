"""Checkpoint folders: atomic, prunable, resumable.

Layout under ``<out_dir>/checkpoints/``::

    step-00001000/
        model.safetensors        native model file (loadable by load_prior / load_vqgan)
        ema.safetensors          EMA weights as a native model file (priors with EMA on)
        training_state.pt        optimizer, scheduler, scaler, EMA, step, RNG states (per rank),
                                 data order position, best eval loss (torch.load weights_only)
        config.toml              the resolved training config (usable as --config)
        checkpoint.json          step, eval loss, file sizes and sha256, argv, version:
                                 written LAST
    step-00002000/
    step-00003000.damaged/       a checkpoint that failed verification on resume, moved aside
    latest.json                  {"step": ..., "folder": ...} (informational)
    best.json                    the step with the lowest eval loss

A checkpoint is written into a hidden ``.step-XXXXXXXX.partial-<pid>`` folder, each file through
``atomic_write``, ``checkpoint.json`` last, then the folder is renamed into place. A crash at any
point leaves either no new folder or a complete one; :meth:`CheckpointManager.latest` only ever
returns folders whose ``checkpoint.json`` lists files that exist with the recorded sizes.

Resuming (:meth:`CheckpointManager.open_resume`) also checks every file against the sha256 the
manifest recorded and reads it: with ``--resume auto`` a damaged newest checkpoint (flipped
bytes, a torn zip, a zero-byte state file) is moved aside as ``step-XXXXXXXX.damaged`` with a
warning and the previous one is used; an explicit ``--resume PATH|step-N`` is an error instead.
Pruning renames a folder to a hidden ``.step-XXXXXXXX.prune-<pid>`` before deleting it, so a kill
half-way leaves nothing that looks like a checkpoint; leftovers (and incomplete ``step-`` folders
an older version's interrupted prune left) are removed by the next save. A full disk during a
save is one error line naming the folder and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d{8,})$")
STEP_ARG_RE = re.compile(r"^step-(\d+)$")  # --resume step-N (any zero padding)
DAMAGED_SUFFIX = ".damaged"
META = "checkpoint.json"
STATE = "training_state.pt"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
CONFIG = "config.toml"


T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from (incomplete, damaged or unreadable)."""


class DiskFullError(OSError):
    """The disk filled up while a checkpoint (or an export) was written."""


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


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint whose files are all there with the recorded sizes and (for
    checkpoints written since sha256s are recorded) the recorded sha256. Raises
    :class:`CheckpointError` naming the folder and the first problem."""
    from ..sundae_lib._helpers import file_sha256

    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: no readable {META} ({type(exc).__name__}); the save was "
                              "interrupted or the folder was damaged") from None
    if not isinstance(meta, dict) or not meta.get("complete") or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"checkpoint {folder}: {META} does not describe a complete checkpoint")
    hashes = meta.get("sha256") or {}
    for name, size in meta["files"].items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(f"checkpoint {folder}: {name} has {p.stat().st_size} bytes, the save wrote {size}")
        if name in hashes and file_sha256(p) != hashes[name]:
            raise CheckpointError(f"checkpoint {folder}: {name} is damaged (its sha256 differs from the one "
                                  "recorded when it was saved)")
    return meta


def read_checkpoint_files(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model weights, training state)`` of a checkpoint folder, both on the CPU; raises when a
    file cannot be read (a torn zip, a zero-byte file)."""
    import torch

    from ..sundae_lib._helpers import load_safetensors

    weights = load_safetensors(folder / MODEL)
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{STATE} holds no training state")
    return weights, state


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain, or torch.save's zip writer failing (it
    reports a full disk as ``unexpected pos`` / ``file write failed`` without an errno)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_space(folder: Path) -> str:
    for p in (folder, *folder.parents):
        try:
            free = shutil.disk_usage(p).free
        except OSError:
            continue
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
            if free < 1024 or unit == "TiB":
                return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
            free /= 1024
    return "unknown"


@contextlib.contextmanager
def disk_full_as_one_line(what: str, folder: Path) -> Iterator[None]:
    """Turn a full disk while writing ``what`` into a :class:`DiskFullError` with one line that
    names the folder and its free space (instead of torch's ``unexpected pos ...``)."""
    try:
        yield
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on the disk while writing {what} in {folder} ({_free_space(Path(folder))} free there); "
            "free some space (or lower run.keep_last, or move run.out_dir) and rerun the same command to resume",
        ) from exc


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
        """``--resume``: ``never`` -> None; ``auto`` -> the newest intact checkpoint or None;
        ``step-N`` -> that step under this root; a path -> that checkpoint folder, or the newest
        intact one of a run folder. Files are checked against their recorded size and sha256;
        nothing is moved (see :meth:`open_resume`)."""
        found = self._resume(spec, read=None, quarantine=False)
        return found[0] if found is not None else None

    def open_resume(self, spec: str, read: Callable[[Path], T]) -> tuple[Path, T] | None:
        """Like :meth:`resolve_resume`, and ``read(folder)`` loads the chosen checkpoint's files
        (``(folder, read(folder))``, or None to start fresh). With ``auto``, a checkpoint that
        fails verification or whose files cannot be read is moved aside to
        ``step-XXXXXXXX.damaged`` with a warning naming it, and the previous one is tried; an
        explicit folder or step that is damaged raises :class:`CheckpointError`."""
        return self._resume(spec, read=read, quarantine=True)

    def _resume(self, spec: str, *, read, quarantine: bool):
        if spec == "never":
            return None
        if spec == "auto":
            return self._newest_intact(read, quarantine)
        m = STEP_ARG_RE.match(spec)
        if m and not Path(spec).exists():
            path = self.root / step_folder_name(int(m.group(1)))
            if not path.is_dir():
                have = ", ".join(p.name for _, p in self.complete_checkpoints()) or "none"
                raise FileNotFoundError(f"--resume {spec}: no folder {path.name} in {self.root} (complete "
                                        f"checkpoints: {have})")
        else:
            path = Path(spec).expanduser()
            if path.is_dir() and read_checkpoint_meta(path) is None and (path / "checkpoints").is_dir():
                found = CheckpointManager(path / "checkpoints")._newest_intact(read, quarantine)
                return found if found is not None else _no_ckpt(path)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"--resume {spec!r}: no such checkpoint folder; give a step-XXXXXXXX folder, step-N "
                    "(in run.out_dir), a run folder, 'auto' (latest in run.out_dir) or 'never'"
                )
        if read_checkpoint_meta(path) is None:
            raise CheckpointError(
                f"--resume {spec!r} is not a complete checkpoint (no valid {META}; the save was "
                "probably interrupted); pick an earlier step folder or use --resume auto"
            )
        try:
            return path, self._check(path, read)
        except CheckpointError as exc:
            raise CheckpointError(f"--resume {spec!r}: {exc}; pick an earlier step or use --resume auto") from None

    @staticmethod
    def _check(folder: Path, read):
        verify_checkpoint(folder)
        if read is None:
            return None
        try:
            return read(folder)
        except Exception as exc:  # torch / safetensors raise many types for a damaged file
            raise CheckpointError(f"checkpoint {folder} cannot be read ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc

    def _newest_intact(self, read, quarantine: bool):
        """Newest first over every ``step-`` folder: the first that verifies (and reads)."""
        if not self.root.is_dir():
            return None
        folders = sorted(
            ((int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()),
            reverse=True,
        )
        newest_complete = next((step for step, p in folders if read_checkpoint_meta(p) is not None), -1)
        skipped = 0
        for step, folder in folders:
            if step < newest_complete and read_checkpoint_meta(folder) is None:
                continue  # an older incomplete folder is a prune leftover (the next save removes it)
            try:
                payload = self._check(folder, read)
            except CheckpointError as exc:
                skipped += 1
                moved = self._set_aside(folder) if quarantine else None
                logger.warning("%s; %s", exc, f"moved it to {moved.name} and trying the previous checkpoint"
                               if moved else "trying the previous checkpoint")
                continue
            logger.info("resuming from %s", folder)
            return folder, payload
        if skipped:
            logger.warning("no intact checkpoint left in %s: training starts from step 0", self.root)
        return None

    def _set_aside(self, folder: Path) -> Path | None:
        target = folder.with_name(folder.name + DAMAGED_SUFFIX)
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}-{n}")
        try:
            os.replace(folder, target)
        except OSError as exc:
            logger.warning("could not move %s aside (%s)", folder, exc)
            return None
        return target

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
        from ..sundae_lib._helpers import atomic_write, file_sha256

        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        final = self.root / step_folder_name(step)
        tmp = self.root / f".{final.name}.partial-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            with disk_full_as_one_line(f"checkpoint {final.name}", self.root):
                sizes, hashes = {}, {}
                for name, write in writers.items():
                    atomic_write(tmp / name, write)
                    sizes[name] = (tmp / name).stat().st_size
                    hashes[name] = file_sha256(tmp / name)  # read back: what is on the disk
                record = {**meta, "step": step, "eval_loss": eval_loss, "files": sizes, "sha256": hashes,
                          "complete": True}
                _write_json(tmp / META, record)
            if final.exists():  # re-saving a step (e.g. a signal right after a periodic save)
                self._delete(final)
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
                self._delete(p)

    def _delete(self, folder: Path) -> None:
        """Rename to a hidden ``.step-….prune-<pid>`` first, then delete: a kill during the
        (slow) delete leaves a hidden leftover that the next save removes, never a ``step-``
        folder with half its files."""
        doomed = self.root / f".{folder.name}.prune-{os.getpid()}"
        try:
            os.replace(folder, doomed)
        except OSError:
            doomed = folder
        shutil.rmtree(doomed, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Hidden partial saves and prunes of killed runs, and incomplete ``step-`` folders older
        than the newest complete checkpoint (what an interrupted prune of older versions left:
        saves are renamed into place whole, so nothing else makes them)."""
        for stale in (*self.root.glob(".step-*.partial-*"), *self.root.glob(".step-*.prune-*")):
            shutil.rmtree(stale, ignore_errors=True)
        found = self.complete_checkpoints()
        if not found:
            return
        newest = found[-1][0]
        for p in self.root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and int(m.group(1)) < newest and read_checkpoint_meta(p) is None:
                logger.info("removing %s: an incomplete checkpoint folder (an interrupted prune)", p)
                self._delete(p)


def _no_ckpt(path: Path) -> Path:
    raise FileNotFoundError(f"--resume {str(path)!r}: the run folder has no complete checkpoint yet")
