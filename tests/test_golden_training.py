"""Golden training runs: a short fixed-seed ``train_prior`` and ``train_vqgan`` run (each trained
fresh, then resumed from its checkpoint for a few more steps) give the recorded losses, metrics,
run-folder files and final weights.

A regression guard for refactors of the training loops (issue 16: one scaffold for both loops):
the values in ``tests/golden/train_runs.json`` were recorded once from the loops as they were
before that refactor. Every path of the shared loop is taken: gradient accumulation, EMA, eval,
checkpoints, previews, resume (``--resume auto``), export, and for the VQ-GAN the discriminator
and the dead-code restart generator.

Weights are compared by a sha256 over every tensor's bytes, losses and metric values exactly,
on the platform that recorded them (same torch version and CPU capability, one torch thread,
fp32): a refactor must leave them bit-identical. Elsewhere (another CPU's kernels round
differently) the losses and metrics are compared to 1e-3 and the digests are not compared. If a
deliberate change moves the numbers, re-record with
``python tests/test_golden_training.py --record`` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / "golden" / "train_runs.json"
REPO = Path(__file__).resolve().parents[1]
QUIET = ["run.progress=false", "run.tensorboard=false", "run.deterministic=true"]


def _digits(folder: Path) -> Path:
    """80 real digits (8 per class) average-pooled to 8x8, as in test_trainer_resume.py."""
    data = np.load(REPO / "data" / "mnist_5k.npz")
    images, labels = data["images"], data["labels"].astype(np.int64)
    idx = np.concatenate([np.flatnonzero(labels == k)[:8] for k in range(10)])
    x = images[idx].astype(np.float32)[:, 2:26, 2:26].reshape(-1, 8, 3, 8, 3).mean(axis=(2, 4))
    path = folder / "d8.npz"
    np.savez(path, images=x.round().astype(np.uint8), labels=labels[idx])
    return path


def _image_folder(root: Path) -> Path:
    """12 RGB images 16x16 in three class folders (stripes of growing width plus fixed noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            base = np.zeros((16, 16, 3), np.uint8)
            base[:, : 3 + 3 * i] = 60 + 60 * "abc".index(c)
            noise = (rng.random((16, 16, 3)) * 40).astype(np.uint8)
            Image.fromarray(base + noise).save(root / c / f"{i}.png")
    return root


def _prior_overrides(data: Path, out: Path, steps: int) -> list[str]:
    return [
        "model=tiny", f"data.path={data}", "data.eval_fraction=0.1", "codec.levels=16",
        "optim.batch_size=4", "optim.grad_accum=2", "optim.lr=3e-3", "optim.warmup_steps=2",
        "optim.ema_decay=0.9", "loss.region_corruption=0.5", "sampling.steps=2", "sampling.num_samples=2",
        f"run.out_dir={out}", f"run.max_steps={steps}", "run.eval_every=2", "run.sample_every=3",
        "run.checkpoint_every=2", "run.log_every=1", "run.keep_last=2", *QUIET,
    ]


def _vqgan_overrides(data: Path, out: Path, steps: int) -> list[str]:
    return [
        "model=tiny", f"data.path={data}", "data.eval_fraction=0.25", "loss.disc_start=1",
        "loss.disc_num_layers=1", "loss.disc_ndf=8", "loss.codebook_remedy=restart",
        "optim.batch_size=3", "optim.grad_accum=2", "optim.lr=2e-3", "optim.ema_decay=0.9",
        f"run.out_dir={out}", f"run.max_steps={steps}", "run.eval_every=2", "run.sample_every=3",
        "run.checkpoint_every=2", "run.log_every=1", "run.recon_images=2", "run.keep_last=2", *QUIET,
    ]


def _digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _files(out: Path) -> list[str]:
    """The run folder's files (relative, sorted); tensorboard is off."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _metrics(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("time")
        if "train/images_per_s" in row:  # a wall-clock rate: only its presence is recorded
            assert row["train/images_per_s"] > 0
            row["train/images_per_s"] = "timed"
    return rows


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"step": result["step"], "stopped": result["stopped"], "losses": result["losses"],
            "best": list(result["best"]) if result["best"] else None,
            "model": _digest(result["model"].state_dict())}


def _run_case(case: str, tmp: Path) -> dict[str, Any]:
    """Train 4 steps fresh, then resume the same folder to 6 steps; what to compare."""
    from comfyui_sundae.sundae_lib._helpers import load_safetensors
    from comfyui_sundae.trainer.config import load_stage

    if case == "prior":
        from comfyui_sundae.trainer.train_prior import train_prior as train

        data, overrides = _digits(tmp), _prior_overrides
    else:
        from comfyui_sundae.trainer.train_vqgan import train_vqgan as train

        data, overrides = _image_folder(tmp / "images"), _vqgan_overrides
    out = tmp / "run"
    first, _ = load_stage(case, None, overrides(data, out, 4))
    a = train(first, resume="never", argv=["golden"])
    second, _ = load_stage(case, None, overrides(data, out, 6))
    b = train(second, resume="auto", argv=["golden"])
    ck = out / "checkpoints" / "step-00000006"
    return {
        "first": _summary(a),
        "resumed": _summary(b),
        "export": _digest(load_safetensors(Path(b["export"]))),
        "checkpoint_ema": _digest(load_safetensors(ck / "ema.safetensors")),
        "files": _files(out),
        "metrics": _metrics(out),
    }


def _platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _record() -> None:
    import tempfile

    torch.set_num_threads(1)
    os.environ["SUNDAE_CPU_DTYPE"] = "fp32"
    golden: dict[str, Any] = {"platform": _platform()}
    for case in ("prior", "vqgan"):
        torch.manual_seed(0)
        np.random.seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            golden[case] = _run_case(case, Path(tmp))
        torch.use_deterministic_algorithms(False)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


@pytest.fixture
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


pytestmark = pytest.mark.usefixtures("one_thread", "_restore_determinism")


def _close(got, want, where: str) -> None:
    """Numbers (nested in lists / dicts) equal to 1e-3 relative; everything else equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {got} vs {want}"
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} vs {want}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-6), f"{where}: {got} vs {want}"
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def _strip_digests(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in ("export", "checkpoint_ema")}
    out["first"] = {k: v for k, v in record["first"].items() if k != "model"}
    out["resumed"] = {k: v for k, v in record["resumed"].items() if k != "model"}
    return out


@pytest.mark.parametrize("case", ["prior", "vqgan"])
def test_training_run_unchanged(case, golden, tmp_path):
    got = _run_case(case, tmp_path)
    want = golden[case]
    # the runs themselves are sane: trained and resumed, losses finite, an export written
    assert got["first"]["step"] == 4 and got["resumed"]["step"] == 6 and len(got["resumed"]["losses"]) == 2
    assert all(np.isfinite(got["first"]["losses"] + got["resumed"]["losses"]))
    assert got["first"]["model"] != got["resumed"]["model"]
    if golden["platform"] == _platform():
        for key in ("first", "resumed"):
            for field in want[key]:
                assert got[key][field] == want[key][field], f"{case}: {key} {field} differs from the recording"
        for key in ("export", "checkpoint_ema", "files", "metrics"):
            assert got[key] == want[key], f"{case}: {key} differs from the recording"
    else:  # another CPU or torch: the same run, rounded differently
        _close(_strip_digests(got), _strip_digests(want), case)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: PYTHONPATH=... python tests/test_golden_training.py --record")
    _record()
