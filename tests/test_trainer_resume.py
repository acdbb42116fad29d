"""sundae-train resume and crash safety: exact resume (2N steps == N + resume + N), a save that
dies half-way never becomes the checkpoint auto-resume picks, SIGTERM saves then exits."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from comfyui_sundae.trainer.checkpoint import CheckpointManager
from comfyui_sundae.trainer.cli import main
from comfyui_sundae.trainer.config import load_stage
from comfyui_sundae.trainer.train_prior import train_prior

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits8(tmp_path_factory, mnist):
    images, labels = mnist
    idx = np.concatenate([np.flatnonzero(labels == k)[:8] for k in range(10)])
    x = images[idx].astype(np.float32)[:, 2:26, 2:26].reshape(-1, 8, 3, 8, 3).mean(axis=(2, 4))
    path = tmp_path_factory.mktemp("digits") / "d8.npz"
    np.savez(path, images=x.round().astype(np.uint8), labels=labels[idx])
    return path


@pytest.fixture
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def _overrides(data, out, steps, every, extra=()):
    return [
        "model=tiny", f"data.path={data}", "data.eval_fraction=0.1", "codec.levels=16",
        "optim.batch_size=4", "optim.grad_accum=2", "optim.lr=3e-3", "optim.warmup_steps=2",
        "optim.ema_decay=0.9", "sampling.steps=2", "sampling.num_samples=2",
        f"run.out_dir={out}", f"run.max_steps={steps}", f"run.eval_every={every}", f"run.sample_every={every}",
        f"run.checkpoint_every={every}", "run.log_every=1", "run.deterministic=true", "run.progress=false",
        "run.tensorboard=false", *extra,
    ]


def test_resume_is_exact(tmp_path, digits8, _restore_determinism):
    n = 3
    straight, _ = load_stage("prior", None, _overrides(digits8, tmp_path / "a", 2 * n, n))
    a = train_prior(straight, resume="never")
    first, _ = load_stage("prior", None, _overrides(digits8, tmp_path / "b", n, n))
    b1 = train_prior(first, resume="never")
    second, _ = load_stage("prior", None, _overrides(digits8, tmp_path / "b", 2 * n, n))
    b2 = train_prior(second, resume="auto")
    assert b1["step"] == n and b2["step"] == 2 * n and len(b2["losses"]) == n
    assert a["losses"] == b1["losses"] + b2["losses"]  # bit-identical losses, step by step
    for key, value in a["model"].state_dict().items():
        assert torch.equal(value, b2["model"].state_dict()[key]), key
    for key, value in a["ema"].state_dict().items():
        assert torch.equal(value, b2["ema"].state_dict()[key]), key
    # and the run really trained: weights moved away from the step-N checkpoint
    mid = b1["model"].state_dict()
    assert any(not torch.equal(mid[k], v) for k, v in b2["model"].state_dict().items())
    # metrics of the resumed run continue without duplicates
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 2 * n + 1))


def test_interrupted_save_never_becomes_latest(tmp_path, digits8, monkeypatch):
    out = tmp_path / "run"
    cfg, _ = load_stage("prior", None, _overrides(digits8, out, 4, 2, ["run.deterministic=false"]))
    real_save = torch.save
    calls = []

    def dying_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the step-4 training state: half a file, then the process "dies"
            with open(path, "wb") as fh:
                fh.write(b"\x00" * 100)
            raise OSError("simulated crash while writing the training state")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated crash"):
        train_prior(cfg, resume="never")
    monkeypatch.setattr(torch, "save", real_save)
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step-00000002"]  # temp folder removed
    assert json.loads((ck / "latest.json").read_text())["step"] == 2

    # what a hard kill could leave behind: a torn folder without its manifest, one with a
    # truncated file, and a stray partial folder -- none of them may be picked
    torn = ck / "step-00000006"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x00" * 10)
    bad = ck / "step-00000008"
    bad.mkdir()
    for f in (ck / "step-00000002").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "training_state.pt").write_bytes(b"truncated")
    (ck / ".step-00000010.partial-1").mkdir()
    manager = CheckpointManager(ck)
    assert manager.latest() == ck / "step-00000002"
    assert manager.resolve_resume("auto") == ck / "step-00000002"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.resolve_resume(str(bad))

    result = train_prior(cfg, resume="auto")
    assert result["step"] == 4 and len(result["losses"]) == 2 and result["export"]
    assert (ck / "step-00000004" / "checkpoint.json").is_file()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, digits8):
    out = tmp_path / "run"
    args = ["prior", *[x for o in _overrides(digits8, out, 10_000, 10_000, ["run.deterministic=false"]) for x in ("--set", o)]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "comfyui_sundae.trainer", *args], stdout=err, stderr=err,
                                env=env, cwd=tmp_path)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().count("train/loss") >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=240)
    log = (tmp_path / "stderr.txt").read_text()
    assert code == 128 + signal.SIGTERM, log
    assert "received SIGTERM" in log and "checkpoint saved" in log
    latest = CheckpointManager(out / "checkpoints").latest()
    assert latest is not None
    stopped_at = int(latest.name.split("-")[1])
    assert stopped_at >= 2 and not (out / "model.safetensors").exists()

    res = CliRunner().invoke(main, ["prior", *args[1:], "--max-steps", str(stopped_at + 2)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    state = torch.load(out / "checkpoints" / f"step-{stopped_at + 2:08d}" / "training_state.pt", weights_only=True)
    assert state["step"] == stopped_at + 2 and (out / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line]
    assert steps == list(range(1, stopped_at + 3))


def test_step_tail_orders_eval_preview_checkpoint_and_tracks_the_best():
    from types import SimpleNamespace

    from comfyui_sundae.trainer.runtime import StepTail

    run = SimpleNamespace(max_steps=6, eval_every=2, checkpoint_every=3, sample_every=4, keep_best=True)
    scores = {2: 0.5, 3: 0.7, 4: 0.3, 6: 0.4}
    calls = []

    def evaluate(step):
        calls.append(("eval", step))
        return scores[step]

    tail = StepTail(run, SimpleNamespace(is_main=True), has_eval=True, evaluate=evaluate, best=(0, 0.6),
                    preview=lambda step: calls.append(("preview", step)),
                    save=lambda step, score: calls.append(("save", step, score)))
    quiet, stopping = SimpleNamespace(requested=False), SimpleNamespace(requested=True)
    assert [tail(step, quiet) for step in range(1, 6)] == [False] * 5
    assert tail(6, stopping) is True
    assert calls == [
        ("eval", 2),
        ("eval", 3), ("save", 3, 0.7),             # checkpoint step: evaluated for keep_best
        ("eval", 4), ("preview", 4),
        ("eval", 6), ("save", 6, 0.4), ("preview", 6),  # last step: checkpoint, then preview
    ]
    assert tail.best == (4, 0.3)  # lowest score, starting from the restored (0, 0.6)


def test_step_tail_saves_before_a_preview_that_fails_and_goes_on(caplog):
    from types import SimpleNamespace

    from comfyui_sundae.trainer.runtime import StepTail

    run = SimpleNamespace(max_steps=4, eval_every=0, checkpoint_every=2, sample_every=2, keep_best=False)
    saved = []

    def preview(step):
        raise ValueError(f"cannot preview step {step}")

    tail = StepTail(run, SimpleNamespace(is_main=True), has_eval=False, evaluate=None, preview=preview,
                    save=lambda step, score: saved.append(step))
    quiet = SimpleNamespace(requested=False)
    assert [tail(step, quiet) for step in range(1, 5)] == [False] * 4
    assert saved == [2, 4]  # every checkpoint written although every preview failed
    assert "preview at step 2 failed (ValueError: cannot preview step 2); training goes on" in caplog.text


# --------------------------------------------------------------------------------------------
# damaged checkpoints, interrupted prunes, full disks, failing previews (issue #13)
# --------------------------------------------------------------------------------------------


def _train(out, data, steps, every, extra=(), resume="auto"):
    cfg, _ = load_stage("prior", None, _overrides(data, out, steps, every, ["run.deterministic=false", *extra]))
    return train_prior(cfg, resume=resume)


def _flip_bytes_in_tensor(path: Path, key_part: str) -> str:
    """Flip 4 bytes in the middle of one tensor of a .safetensors file (same size)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__" and key_part in k)
    start, end = header[key]["data_offsets"]
    pos = 8 + n + (start + end) // 2
    raw[pos : pos + 4] = bytes(b ^ 0xFF for b in raw[pos : pos + 4])
    path.write_bytes(bytes(raw))
    return key


def test_flipped_bytes_in_a_checkpoint_are_caught_on_resume(tmp_path, digits8, caplog):
    out = tmp_path / "run"
    _train(out, digits8, 4, 2)
    ck = out / "checkpoints"
    record = json.loads((ck / "step-00000004" / "checkpoint.json").read_text())
    assert set(record["sha256"]) == set(record["files"]) and all(len(h) == 64 for h in record["sha256"].values())
    assert _flip_bytes_in_tensor(ck / "step-00000004" / "model.safetensors", "token_emb") == "token_emb.weight"

    # asked for by name: an error that names the folder and the file, nothing moved
    with pytest.raises(ValueError, match=r"step-00000004.*model\.safetensors is damaged \(its sha256 differs"):
        _train(out, digits8, 6, 2, resume=str(ck / "step-00000004"))
    assert (ck / "step-00000004").is_dir()
    # auto: a warning naming it, the folder moved aside, training resumes from step 2
    with caplog.at_level(logging.WARNING):
        result = _train(out, digits8, 6, 2)
    assert "step-00000004: model.safetensors is damaged" in caplog.text
    assert "moved it to step-00000004.damaged" in caplog.text
    assert result["step"] == 6 and len(result["losses"]) == 4
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == [
        "step-00000002", "step-00000004", "step-00000004.damaged", "step-00000006"]


@pytest.mark.parametrize("damage", ["zero-byte", "torn-zip"])
def test_an_unreadable_newest_state_falls_back_to_the_previous_checkpoint(tmp_path, digits8, caplog, damage):
    """What an older version (no sha256 in the manifest) or a save on a full disk could leave:
    the manifest matches the file, but torch cannot read it. Before: `Aborted!` (EOFError) or a
    zip-reader traceback."""
    out = tmp_path / "run"
    _train(out, digits8, 4, 2)
    folder = out / "checkpoints" / "step-00000004"
    state = folder / "training_state.pt"
    if damage == "zero-byte":
        state.write_bytes(b"")
    else:  # the zip's central directory (at the end) overwritten
        raw = bytearray(state.read_bytes())
        raw[-300:] = b"\0" * 300
        state.write_bytes(bytes(raw))
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta["files"]["training_state.pt"] = state.stat().st_size
    meta.pop("sha256", None)  # as written before sha256s were recorded
    (folder / "checkpoint.json").write_text(json.dumps(meta))

    sets = [x for o in _overrides(digits8, out, 6, 2, ["run.deterministic=false"]) for x in ("--set", o)]
    with caplog.at_level(logging.WARNING):
        res = CliRunner().invoke(main, ["prior", *sets])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "Aborted" not in res.output
    assert f"checkpoint {folder} cannot be read" in caplog.text and "step-00000004.damaged" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 7))  # resumed after step 2: 3 and 4 trained again, no duplicates
    assert torch.load(out / "checkpoints" / "step-00000006" / "training_state.pt", weights_only=True)["step"] == 6


def test_resume_step_n_picks_a_checkpoint_explicitly(tmp_path, digits8):
    out = tmp_path / "run"
    _train(out, digits8, 4, 2)
    again = _train(out, digits8, 4, 2, resume="step-2")  # step-4 is intact, step 2 was asked for
    assert again["step"] == 4 and len(again["losses"]) == 2
    with pytest.raises(FileNotFoundError, match=r"step-3: no folder step-00000003 .*step-00000002, step-00000004"):
        _train(out, digits8, 4, 2, resume="step-3")
    res = CliRunner().invoke(main, ["prior", "--help"])
    assert "step-N" in res.output


def _writers(n=10):
    return {"model.safetensors": lambda p: Path(p).write_bytes(b"m" * n),
            "training_state.pt": lambda p: Path(p).write_bytes(b"s" * n)}


def test_a_prune_killed_half_way_leaves_nothing_behind(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    manager = CheckpointManager(ck, keep_last=1)
    manager.save(1, _writers(), meta={})
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # the manifest goes first, then the process is killed
        (Path(path) / "checkpoint.json").unlink()
        raise KeyboardInterrupt("kill -9")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, _writers(), meta={})  # its prune of step 1 dies half-way
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [p.name for p in ck.iterdir() if p.name.startswith("step-")] == ["step-00000002"]
    assert manager.latest() == ck / "step-00000002"
    # what an older version's interrupted prune left: a step folder with half its files
    (ck / "step-00000000").mkdir()
    (ck / "step-00000000" / "model.safetensors").write_bytes(b"m" * 10)
    manager.save(3, _writers(), meta={})
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "step-00000003"]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4305"),  # torch.save
])
def test_a_full_disk_during_a_save_is_one_line_naming_the_folder_and_the_free_space(tmp_path, error):
    ck = tmp_path / "ck"
    manager = CheckpointManager(ck)
    manager.save(1, _writers(), meta={})

    def full(path):
        Path(path).write_bytes(b"s" * 5)
        raise error

    with pytest.raises(OSError) as info:
        manager.save(2, {**_writers(), "training_state.pt": full}, meta={})
    assert info.value.errno == errno.ENOSPC
    message = info.value.strerror
    assert "\n" not in message and "unexpected pos" not in message
    assert f"checkpoint step-00000002 in {ck} (" in message and " free there)" in message
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "step-00000001"]  # nothing half-written


def test_a_full_disk_in_the_cli_is_one_error_line(tmp_path, digits8, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    sets = [x for o in _overrides(digits8, out, 2, 2, ["run.deterministic=false"]) for x in ("--set", o)]
    res = CliRunner().invoke(main, ["prior", *sets])
    monkeypatch.setattr(torch, "save", real_save)
    assert res.exit_code == 1
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: no space left on the disk while writing checkpoint step-00000002 in "
                           f"{out / 'checkpoints'} ("), res.output
    assert "Traceback" not in res.output


def test_guidance_on_unlabelled_data_is_refused_before_step_1(tmp_path, digits8):
    """The mnist-pixels preset (cfg 3) on an unlabelled folder used to fail at every preview."""
    from comfyui_sundae.trainer.config import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"sampling\.cfg_scale = 3\.0 .*has no labels.*--set sampling\.cfg_scale=1"):
        _train(out, digits8, 4, 2, ["data.labels=false", "sampling.cfg_scale=3.0"], resume="never")
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_failing_preview_is_logged_and_training_goes_on(tmp_path, digits8, monkeypatch, caplog):
    from comfyui_sundae.trainer import train_prior as train_prior_module

    def broken(model, data, cfg, path, device):
        raise RuntimeError("the preview broke")

    monkeypatch.setattr(train_prior_module, "_preview", broken)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        result = _train(out, digits8, 4, 2, ["run.checkpoint_every=0"], resume="never")
    assert result["step"] == 4 and result["export"]
    assert "preview at step 2 failed (RuntimeError: the preview broke); training goes on" in caplog.text
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step-00000004"]
