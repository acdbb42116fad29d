"""sundae-train under DDP: two CPU processes on gloo train a tiny prior; after the run the
parameters are bit-identical on both ranks, the loss went down, per-rank RNG streams differ and
rank 0 alone wrote unwrapped checkpoints."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from comfyui_sundae.sundae_lib._helpers import load_safetensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """One rank, set up exactly as torchrun would (environment variables), then the trainer."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from comfyui_sundae.trainer.config import load_stage
    from comfyui_sundae.trainer.train_prior import train_prior

    cfg, _ = load_stage("prior", None, [
        "model=tiny", f"data.path={data}", "data.eval_fraction=0.1", "codec.levels=16",
        "optim.batch_size=4", "optim.grad_accum=2", "optim.lr=1e-2", "optim.ema_decay=0",
        "sampling.steps=2", "sampling.num_samples=2", f"run.out_dir={out}", "run.max_steps=12",
        "run.log_every=1", "run.eval_every=6", "run.sample_every=12", "run.checkpoint_every=6",
        "run.progress=false", "run.tensorboard=false",
    ])
    result = train_prior(cfg, resume="never")
    torch.save({"state": result["model"].state_dict(), "losses": result["losses"]}, f"{dump}/rank{rank}.pt")


@pytest.mark.timeout(600)
def test_two_process_gloo_ddp(tmp_path, mnist):
    images, labels = mnist
    idx = np.concatenate([np.flatnonzero(labels == k)[:8] for k in range(10)])
    x = images[idx].astype(np.float32)[:, 2:26, 2:26].reshape(-1, 8, 3, 8, 3).mean(axis=(2, 4))
    data = tmp_path / "d8.npz"
    np.savez(data, images=x.round().astype(np.uint8), labels=labels[idx])
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(out), str(dump)), nprocs=2, join=True)

    r0 = torch.load(dump / "rank0.pt", weights_only=True)
    r1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    # each rank saw its own half of the data, so their local losses differ ...
    assert r0["losses"] != r1["losses"]
    # ... and the (all-reduced) logged loss went down
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(train) == 12
    assert np.mean(train[-3:]) < np.mean(train[:3]) - 0.1, train

    ck = out / "checkpoints" / "step-00000012"
    weights = load_safetensors(ck / "model.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.", "prior.")) for k in weights)
    assert all(torch.equal(weights[k], r0["state"][k]) for k in weights)
    state = torch.load(ck / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["order"]["world_size"] == 2
    g0, g1 = (s["generators"]["loss"] for s in state["rng"])
    assert not torch.equal(g0, g1)  # per-rank seeds
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
