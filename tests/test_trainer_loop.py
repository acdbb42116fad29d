"""The shared training-loop scaffold (``trainer/loop.py``) with a toy trainee: a linear model on
fixed data plugs in as the prior and the VQ-GAN do and gets the run folder, metrics,
checkpoints, exact resume, evaluation, previews and the export without code of its own."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from comfyui_sundae.sundae_lib._helpers import load_safetensors
from comfyui_sundae.trainer import loop
from comfyui_sundae.trainer.config import RunConfig
from comfyui_sundae.trainer.data import BatchOrder, Split
from comfyui_sundae.trainer.runtime import EMA
from safetensors.torch import save_file
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


class Line:
    """``y = x @ w + b`` by SGD with momentum; targets get noise from a generator of its own,
    so an exact resume needs the optimizer state, the data position and the RNG stream back."""

    names = loop.Names("line", "line", preview="fit-", loss="train/mse", postfix=("mse", "train/mse"),
                       score="eval/mse")

    def __init__(self, cfg, info) -> None:
        data = torch.Generator().manual_seed(1)
        self.x = torch.randn(40, 3, generator=data)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
        self.split = Split(train=np.arange(30), eval=np.arange(30, 40), info={"train_items": 30, "eval_items": 10})
        self.model = nn.Linear(3, 1)  # initial weights from the loop's seed
        self.ema = EMA(self.model, 0.5) if cfg.ema else None
        self.order = BatchOrder(self.split.train, 5, rank=info.rank, world_size=info.world_size, seed=cfg.run.seed)
        self.noise = torch.Generator().manual_seed(3)
        self.generators = {"noise": self.noise}
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.resolved = {"toy": {"lr": 0.1, "ema": cfg.ema}}
        self.previews: list[str] = []

    def log_summary(self) -> None:
        pass

    def train_step(self, step: int) -> loop.StepLog:
        idx, _ = self.order.next()
        target = self.y[idx] + 0.01 * torch.randn(len(idx), 1, generator=self.noise)
        loss = nn.functional.mse_loss(self.model(self.x[idx]), target)
        self.opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.opt.step()
        return loop.StepLog({"train/mse": float(loss.detach())}, norm, len(idx))

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        idx = self.split.eval
        return {"eval/mse": float(nn.functional.mse_loss(model(self.x[idx]), self.y[idx]))}

    def preview(self, model: nn.Module, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a picture")
        self.previews.append(path.name)

    def save_model(self, model: nn.Module, path, step: int) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"step": str(step)})


def _cfg(out: Path, steps: int, *, ema: bool = True) -> SimpleNamespace:
    run = RunConfig(out_dir=str(out), max_steps=steps, device="cpu", precision="fp32", log_every=1,
                    eval_every=2, checkpoint_every=2, sample_every=3, keep_last=5, progress=False,
                    tensorboard=False)
    return SimpleNamespace(run=run, ema=ema)


def _train(out: Path, steps: int, resume: str, **kw) -> dict:
    return loop.run_training(_cfg(out, steps, **kw), Line, resume=resume, argv=["toy"])


def test_a_toy_trainee_gets_the_run_folder_metrics_checkpoints_and_export(tmp_path):
    out = tmp_path / "run"
    result = _train(out, 4, "never")
    assert result["step"] == 4 and result["stopped"] is None and len(result["losses"]) == 4
    assert result["export"] == str(out / "model.safetensors") and result["out_dir"] == str(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    ck = [f"checkpoints/step-0000000{s}/{n}" for s in (2, 4) for n in
          ("checkpoint.json", "config.toml", "ema.safetensors", "model.safetensors", "training_state.pt")]
    assert files == sorted([
        "config.toml", "split.json", "run.json", "metrics.jsonl", "model.safetensors",
        "samples/fit-00000003.png", "samples/fit-00000004.png",  # every 3 steps, and the last
        "checkpoints/latest.json", "checkpoints/best.json", *ck,
    ])
    assert "[toy]" in (out / "config.toml").read_text() and json.loads((out / "split.json").read_text())["eval_items"] == 10
    assert json.loads((out / "run.json").read_text())["argv"] == ["toy"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/mse" in r]
    assert [sorted(r) for r in train] == [["step", "time", "train/grad_norm", "train/images_per_s", "train/lr",
                                           "train/mse"]] * 4
    assert [r["train/mse"] for r in train] == result["losses"]  # one step a record, one rank
    assert [r["step"] for r in rows if "eval/mse" in r] == [2, 4]

    state = torch.load(out / "checkpoints" / "step-00000004" / "training_state.pt", weights_only=True)
    assert list(state) == ["step", "opt", "ema", "order", "rng", "best"]
    assert state["step"] == 4 and state["order"]["batch"] == 4 and "noise" in state["rng"][0]["generators"]
    exported = load_safetensors(out / "model.safetensors")
    ema = result["ema"].state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # the export is the EMA
    assert any(not torch.equal(ema[k], v) for k, v in result["model"].state_dict().items())


def test_resume_through_the_loop_is_exact(tmp_path):
    straight = _train(tmp_path / "a", 6, "never")
    first = _train(tmp_path / "b", 4, "never")
    second = _train(tmp_path / "b", 6, "auto")
    assert first["losses"] + second["losses"] == straight["losses"]
    for name, value in straight["model"].state_dict().items():
        assert torch.equal(value, second["model"].state_dict()[name]), name
    for name, value in straight["ema"].state_dict().items():
        assert torch.equal(value, second["ema"].state_dict()[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "train/mse" in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_without_ema_restarts_the_ema_from_the_loaded_weights(tmp_path, caplog):
    out = tmp_path / "run"
    _train(out, 2, "never", ema=False)
    saved = load_safetensors(out / "checkpoints" / "step-00000002" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        result = _train(out, 2, "auto", ema=True)  # nothing left to train: resume, then export
    assert "the checkpoint has no EMA weights: EMA restarts from the current weights" in caplog.text
    exported = load_safetensors(out / "model.safetensors")
    assert all(torch.equal(exported[k], saved[k]) for k in saved) and result["step"] == 2


def test_eval_batches_shard_the_held_out_items_over_ranks():
    items = np.arange(100, 111)
    cfg = SimpleNamespace(optim=SimpleNamespace(batch_size=2), run=SimpleNamespace(eval_batches=0))
    rank1 = loop.eval_batches(items, cfg, SimpleNamespace(rank=1, world_size=3))
    assert [b.tolist() for b in rank1] == [[101, 104], [107, 110]]
    shards = [loop.eval_batches(items, cfg, SimpleNamespace(rank=r, world_size=3)) for r in range(3)]
    assert sorted(int(i) for shard in shards for b in shard for i in b) == items.tolist()
    cfg.run.eval_batches = 1
    assert [b.tolist() for b in loop.eval_batches(items, cfg, SimpleNamespace(rank=0, world_size=3))] == [[100, 103]]


def test_evaluating_restores_the_mode_even_when_the_block_fails():
    model = nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), loop.evaluating(model):
        assert not model.training
        raise RuntimeError("a preview broke")
    assert model.training
