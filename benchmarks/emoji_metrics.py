"""The yardsticks of ``eval_emoji.py``: the judge CNN (trained on the training split) whose
accuracy and 128-d penultimate features score real, reconstructed and sampled emoji, the Frechet
distance between feature sets, and nearest-neighbour pixel distances for the not-a-copy rule.
Pure functions of tensors and arrays; the files, models and cache are ``eval_emoji.py``'s.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------
# the judge
# ------------------------------------------------------------------------------------------


def _block(cin: int, cout: int, *, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Judge(nn.Module):
    """A small CNN for 64x64 RGB emoji: strided stem, three conv + pool blocks (-> 4x4x128),
    a 128-d penultimate layer (the Frechet features) and 9 logits. ~22 M multiply-adds."""

    def __init__(self, num_classes: int = 9) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *_block(3, 32, k=5, stride=2),  # 64 -> 32
            *_block(32, 32), nn.MaxPool2d(2),  # -> 16
            *_block(32, 64), nn.MaxPool2d(2),  # -> 8
            *_block(64, 128), nn.MaxPool2d(2),  # -> 4
        )
        self.fc = nn.Linear(128 * 4 * 4, 128)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, 3, 64, 64] in [0, 1] -> [b, 128]."""
        return F.relu(self.fc(self.conv(x - 0.5).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.features(x)))


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random shift of up to 4 px (white fill) and a coin-flip mirror for the whole batch."""
    dx, dy = torch.randint(-4, 5, (2,), generator=gen).tolist()
    out = F.pad(batch, (4, 4, 4, 4), value=1.0)[..., 4 + dy:68 + dy, 4 + dx:68 + dx]
    return out.flip(-1) if torch.rand((), generator=gen) < 0.5 else out


def train_judge(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, epochs: int, seed: int,
                device: torch.device) -> Judge:
    """Class-balanced draws (each class equally likely; an "epoch" = len(x) draws), Adam with a
    linear decay to 0, batch 64."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge(num_classes).to(device)
    weights = (1.0 / torch.bincount(y, minlength=num_classes).double())[y]
    steps_per_epoch = max(1, len(x) // 64)
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
    judge.train()
    for _ in range(total):
        idx = torch.multinomial(weights, 64, replacement=True, generator=gen)
        loss = F.cross_entropy(judge(augment(x[idx], gen).to(device)), y[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return judge.eval()


@torch.no_grad()
def judge_eval(judge: Judge, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """x: [n, 3, 64, 64] in [0, 1] -> predictions [n] and float64 features [n, 128]."""
    preds, feats = [], []
    for i in range(0, len(x), 256):
        f = judge.features(x[i:i + 256].to(device))
        feats.append(f.cpu())
        preds.append(judge.out(f).argmax(1).cpu())
    return torch.cat(preds), torch.cat(feats).double().numpy()


def accuracy_report(preds: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """Overall accuracy, per-class recall (None for an absent class) and balanced accuracy
    (the mean recall over the classes present)."""
    per = [float((preds[y == c] == c).float().mean()) if (y == c).any() else None for c in range(num_classes)]
    present = [p for p in per if p is not None]
    return {"accuracy": float((preds == y).float().mean()), "per_class": per,
            "balanced_accuracy": float(np.mean(present)), "n": len(y)}


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[n, d]`` (float64):
    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``; the last trace is the
    sum of square roots of the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


# ------------------------------------------------------------------------------------------
# distances
# ------------------------------------------------------------------------------------------


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image L2 distance over all pixels and channels, [0, 1] scale, float64."""
    return (a.double() - b.double()).flatten(1).norm(dim=1)


@torch.no_grad()
def nearest(queries: torch.Tensor, bank: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest ``bank`` image (L2 over all pixels, [0, 1] scale) of every query: the candidate is
    found in float32 (|a|^2 + |b|^2 - 2ab), its distance recomputed exactly in float64.
    Returns (distances float64 [n], indices int64 [n])."""
    flat = bank.flatten(1)
    norms = flat.pow(2).sum(1)
    idx = []
    for i in range(0, len(queries), batch):
        q = queries[i:i + batch].flatten(1).float()
        d2 = norms[None] - 2 * q @ flat.T  # |q|^2 is the same for every candidate of a row
        idx.append(d2.argmin(1))
    idx = torch.cat(idx)
    return l2(queries, bank[idx]), idx


def copy_report(dist: torch.Tensor, threshold: float) -> dict:
    """Share of near-identical items (distance <= threshold) and the distance distribution."""
    return {"near_identical_share": float((dist <= threshold).double().mean()),
            "median": float(torch.quantile(dist, 0.5)), "p10": float(torch.quantile(dist, 0.1)),
            "min": float(dist.min()), "n": len(dist)}
