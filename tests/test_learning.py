"""A tiny class-conditional SUNDAE prior really learns: real MNIST digits in, recognisable
digits of the requested class out.

Data: the ``mnist`` fixture (5,000 real digits), 2 px border cropped, 2×2 average-pooled to
12×12 and quantized to 4 grey levels (= a 4-token codebook, a pixel-level prior like the paper's
MNIST experiment). Split as ``data/mnist_train_4k.npz``: per class the first 400 digits train,
the last 100 are held out.

Judge: a nearest-centroid classifier fitted on the real training tokens (independent of the
prior), sanity-checked on the held-out real digits.

Training: ``sundae_loss`` (2 unroll steps, class dropout 0.1) with AdamW, warmup + cosine, 400
steps of batch 16 on one thread. Then 10 samples per class, 25 steps, T 1.0 → 0.7, with and
without classifier-free guidance.

Measured (torch 2.13 CPU, 1 thread, seed 0, on the shared 2-core machine at load ~8):
training 39 s CPU / ~90 s wall, whole test 52 s CPU / 119 s wall; loss 1.41 -> 0.61; judge on
held-out real digits 0.795; class accuracy of the samples 0.69 with cfg 3 and 0.39 with cfg 1
(chance 0.10). Other seeds (1, 2) gave 0.65 / 0.61 with cfg 3 and 0.37 / 0.24 with cfg 1,
hence the thresholds below.
Threads are pinned to 1: with 2 threads on a busy 2-core machine a step was 9× slower
(OpenMP threads spin-waiting for a descheduled sibling), and one thread keeps results exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib import PriorConfig, SundaePrior, sample, sundae_loss

SEED = 0
LEVELS = 4
TRAIN_STEPS = 400
BATCH = 16
LR = 4e-3
SAMPLES_PER_CLASS = 10
SAMPLE_STEPS = 25
CHANCE = 0.1
MIN_ACC_CFG = 0.4  # measured 0.69 (seed 0); 0.51..0.71 over seeds 0-2 and step counts
MIN_ACC_NO_CFG = 0.18  # measured 0.39 (seed 0); 0.24 at worst over seeds 0-2
MIN_JUDGE_ACC = 0.7  # measured 0.795


pytestmark = pytest.mark.usefixtures("one_thread")


def to_tokens(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[n, 28, 28]`` -> int64 tokens ``[n, 12, 12]`` in ``0..LEVELS-1``."""
    x = torch.from_numpy(images).float()[:, None, 2:26, 2:26]  # [n, 1, 24, 24]
    x = F.avg_pool2d(x, 2)[:, 0]  # [n, 12, 12]
    return torch.round(x / 255 * (LEVELS - 1)).long()


def split(labels: torch.Tensor) -> torch.Tensor:
    """Bool [n]: True for the first 400 digits of each class (training), False for the rest."""
    train = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        train[(labels == c).nonzero().squeeze(1)[:400]] = True
    return train


class NearestCentroid:
    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.centroids = torch.stack([tokens[labels == c].float().mean(0) for c in range(10)])

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cdist(tokens.float().flatten(1), self.centroids.flatten(1)).argmin(1)


def test_tiny_prior_learns_class_conditional_digits(mnist):
    images, labels_np = mnist
    tokens, labels = to_tokens(images), torch.from_numpy(labels_np)
    train = split(labels)
    x_train, y_train = tokens[train], labels[train]
    x_test, y_test = tokens[~train], labels[~train]
    assert x_train.shape == (4000, 12, 12) and int(tokens.max()) == LEVELS - 1

    judge = NearestCentroid(x_train, y_train)
    judge_acc = (judge(x_test) == y_test).float().mean().item()
    assert judge_acc >= MIN_JUDGE_ACC, f"the judge itself is weak: {judge_acc:.3f}"

    torch.manual_seed(SEED)
    config = PriorConfig(
        codebook_size=LEVELS,
        grid=(12, 12),
        num_classes=10,
        class_dropout=0.1,
        dim=32,
        heads=2,
        depth=(1, 1, 1),
        ff_mult=2,
        attn_resampling=False,
    )
    prior = SundaePrior(config)
    opt = torch.optim.AdamW(prior.parameters(), lr=LR, weight_decay=0.01)
    warmup = 20

    def lr_factor(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * step / TRAIN_STEPS))
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * cosine)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    g = torch.Generator().manual_seed(SEED)
    losses = []
    prior.train()
    for _ in range(TRAIN_STEPS):
        idx = torch.randint(0, len(x_train), (BATCH,), generator=g)
        loss = sundae_loss(prior, x_train[idx], y_train[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    first, last = losses[0], float(np.mean(losses[-50:]))
    # an untrained model predicts ~uniform over 4 tokens: cross-entropy ln 4 = 1.386
    assert first > 1.2, f"initial loss {first:.3f} should be near ln 4"
    assert last < 0.75, f"loss went {first:.3f} -> {last:.3f}; the prior did not learn"

    wanted = torch.arange(10).repeat_interleave(SAMPLES_PER_CLASS)
    accuracy = {}
    for cfg in (3.0, 1.0):
        out = sample(
            prior,
            labels=wanted,
            batch_size=len(wanted),
            steps=SAMPLE_STEPS,
            temperature=(1.0, 0.7),
            cfg_scale=cfg,
            generator=torch.Generator().manual_seed(SEED + 1),
        )
        assert out.shape == (len(wanted), 12, 12)
        accuracy[cfg] = (judge(out) == wanted).float().mean().item()
    report = f"loss {first:.3f} -> {last:.3f}, judge {judge_acc:.3f}, samples {accuracy}"
    print(f"test_learning: {report}")  # shown with pytest -s / -rP
    assert accuracy[3.0] >= MIN_ACC_CFG, f"guided samples not class-recognisable: {report}"
    assert accuracy[1.0] >= MIN_ACC_NO_CFG, f"unguided samples at chance ({CHANCE}): {report}"
    assert accuracy[3.0] > accuracy[1.0], f"guidance should help: {report}"
