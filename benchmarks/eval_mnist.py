"""Quality evaluation of the shipped MNIST priors (run by hand; prints tables, writes JSON).

A small CNN "judge" is trained on the 4,000 training digits (`data/mnist_train_4k.npz`) and
tested on the 1,000 held-out ones (`data/mnist_test_1k.npz`). For each prior it reports:

- class-conditional accuracy: 100 samples per class, judged by the CNN (target >= 90%);
- Frechet distance in the CNN's penultimate features between samples and the held-out digits,
  next to real-vs-real (train vs held-out) and decoded-uniform-noise baselines;
- inpainting: the bottom half of every held-out digit regenerated with its true class; judge
  accuracy of the completions and how well the kept top half is preserved;
- a sweep over 10 / 25 / 50 / 100 steps with and without early stop, and cfg scales:
  quality and seconds per sample.

    python benchmarks/eval_mnist.py                          # both shipped priors
    python benchmarks/eval_mnist.py --prior mnist-vq --quick # fewer samples, faster
    python benchmarks/eval_mnist.py --prior path/to/prior.safetensors --vqgan path/to/vq.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "shipped_models"


# ------------------------------------------------------------------------------------------
# the judge
# ------------------------------------------------------------------------------------------


class Judge(nn.Module):
    """A small CNN: two conv blocks, a 128-d penultimate layer (used for Frechet distance)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.out = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, 1, 28, 28] in [0, 1] -> [b, 128]."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(REPO / "data" / f"mnist_{name}.npz")
    images = torch.from_numpy(data["images"]).float().div(255).unsqueeze(1)
    return images, torch.from_numpy(data["labels"].astype(np.int64))


def train_judge(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 8, seed: int = 0) -> Judge:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            batch = x[idx]
            # light augmentation: random shifts of up to 2 pixels make the judge robust
            dx, dy = (torch.randint(-2, 3, (2,), generator=gen)).tolist()
            batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(judge(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return judge.eval()


@torch.no_grad()
def judge_eval(judge: Judge, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    preds, feats = [], []
    for i in range(0, len(x), 500):
        f = judge.features(x[i:i + 500])
        feats.append(f)
        preds.append(judge.out(f).argmax(1))
    return torch.cat(preds), torch.cat(feats).double().numpy()


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (float64, eigh-based)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


def load_models(prior_arg: str, vqgan_arg: str | None):
    from comfyui_sundae.sundae_lib import PixelCodec, load_prior, load_vqgan
    from comfyui_sundae.sundae_lib._helpers import file_sha256

    named = {
        "mnist-pixels": (SHIPPED / "sundae" / "mnist-pixels.safetensors", None),
        "mnist-vq": (SHIPPED / "sundae" / "mnist-vq.safetensors", SHIPPED / "vqgan" / "mnist-vq-f4.safetensors"),
    }
    prior_path, default_vq = named.get(prior_arg, (Path(prior_arg), None))
    prior = load_prior(str(prior_path))
    spec = getattr(prior, "metadata", {}).get("sundae.codec", "")
    if spec.startswith("pixel"):
        codec = PixelCodec.from_spec(spec)
    elif vqgan_arg or default_vq:
        vq_path = str(vqgan_arg or default_vq)
        want = dict(kv.split("=", 1) for kv in spec.split(":", 1)[-1].split(",") if "=" in kv).get("sha256")
        if want and file_sha256(vq_path) != want:
            raise SystemExit(f"{vq_path} is not the VQ-GAN the prior was trained on (sundae.codec {spec!r})")
        codec = load_vqgan(vq_path)
    else:
        raise SystemExit(f"{prior_path}: no --vqgan given and the prior's codec metadata is {spec!r}")
    if codec.codebook_size != prior.codebook_size:
        raise SystemExit(f"codec has {codec.codebook_size} codes, prior {prior.codebook_size}")
    return prior.eval(), codec.eval(), str(prior_path)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] codec output -> [0, 1] single-channel 28x28 for the judge."""
    x = x.float().clamp(-1, 1).add(1).div(2)
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    return x[..., :28, :28]


SCHEDULE_OVERRIDE: dict = {}  # --temperature / --update-proportion
INPAINT_START = [0]  # --inpaint-start
INPAINT_CFG: list = [None]  # --inpaint-cfg (None = the best cfg of the sample runs)
INPAINT_PER_CLASS: list = [None]  # --inpaint-per-class


def recorded_sampling(prior) -> dict:
    """The temperature / update-proportion schedule the prior records (``sundae.sampling``, else
    the library defaults: ``SamplingDefaults.from_prior``), which is what ``sundae-train sample``
    uses. ``--temperature`` / ``--update-proportion`` replace it."""
    from comfyui_sundae.sundae_lib import SamplingDefaults

    rec = SamplingDefaults.from_prior(prior)
    return {"temperature": rec.temperature, "update_proportion": rec.update_proportion, **SCHEDULE_OVERRIDE}


def _schedule(text: str) -> tuple[float, float]:
    vals = [float(v) for v in text.split(",")]
    if len(vals) == 1:
        vals *= 2
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"expected START or START,END, got {text!r}")
    return tuple(vals)


@torch.no_grad()
def generate(prior, codec, labels: torch.Tensor, *, steps: int, early_stop: bool, cfg: float,
             seed: int, batch: int = 100, **kw) -> tuple[torch.Tensor, float]:
    from comfyui_sundae.sundae_lib import sample

    gen = torch.Generator().manual_seed(seed)
    grid = prior.config.grid
    kw = {**recorded_sampling(prior), **kw}
    out, seconds = [], 0.0
    for i in range(0, len(labels), batch):
        lab = labels[i:i + batch]
        t0 = time.perf_counter()
        tokens = sample(prior, batch_size=len(lab), grid=grid, steps=steps, labels=lab,
                        early_stop=early_stop, cfg_scale=cfg, generator=gen, **kw)
        seconds += time.perf_counter() - t0
        out.append(to_unit(codec.decode(tokens)))
    return torch.cat(out), seconds / len(labels)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------


def evaluate(prior_arg: str, vqgan_arg: str | None, judge: Judge, real: dict, *, quick: bool,
             cfg_grid: tuple[float, ...], default_steps: int, per_class: int | None = None,
             sweep: bool = True, inpaint_n: int | None = None, sweep_per_class: int | None = None) -> dict:
    from comfyui_sundae.sundae_lib import sample

    prior, codec, prior_path = load_models(prior_arg, vqgan_arg)
    test_x, test_y = real["test"]
    test_feats = real["test_feats"]
    per_class = per_class or (20 if quick else 100)
    labels = torch.arange(10).repeat_interleave(per_class)
    res: dict = {"prior": prior_path, "codebook": prior.codebook_size, "grid": list(prior.config.grid),
                 "schedule": recorded_sampling(prior), "steps_default": default_steps}
    print(f"  schedule {res['schedule']}, {default_steps} steps", flush=True)

    def quality(images):
        preds, feats = judge_eval(judge, images)
        return float((preds == labels[: len(images)]).float().mean()), frechet(feats, test_feats)

    # baseline: uniform random tokens, decoded
    gen = torch.Generator().manual_seed(123)
    h, w = prior.config.grid
    noise = torch.randint(0, prior.codebook_size, (len(labels), h, w), generator=gen)
    with torch.no_grad():
        noise_imgs = to_unit(codec.decode(noise))
    res["noise_fd"] = frechet(judge_eval(judge, noise_imgs)[1], test_feats)

    # cfg scales at the default steps
    res["cfg"] = {}
    for cfg in cfg_grid:
        if cfg != 1.0 and not prior.has_null_class:
            continue
        imgs, sps = generate(prior, codec, labels, steps=default_steps, early_stop=True, cfg=cfg, seed=1)
        acc, fd = quality(imgs)
        res["cfg"][cfg] = {"accuracy": acc, "fd": fd, "sec_per_sample": sps}
        print(f"  cfg {cfg:>4}: acc {acc:.3f}  FD {fd:8.2f}  {sps * 1000:.1f} ms/sample", flush=True)
    best_cfg = max(res["cfg"], key=lambda c: (res["cfg"][c]["accuracy"], -res["cfg"][c]["fd"]))
    res["best_cfg"] = best_cfg
    res["accuracy"] = res["cfg"][best_cfg]["accuracy"]
    res["fd"] = res["cfg"][best_cfg]["fd"]
    if 1.0 in res["cfg"]:
        res["accuracy_cfg1"] = res["cfg"][1.0]["accuracy"]

    # steps sweep (fewer samples), with and without early stop, at the best cfg
    sweep_labels = torch.arange(10).repeat_interleave(sweep_per_class or (10 if quick else 30))
    res["steps"] = []
    for steps in (10, 25, 50, 100) if sweep else ():
        for early in (True, False):
            imgs, sps = generate(prior, codec, sweep_labels, steps=steps, early_stop=early, cfg=best_cfg, seed=2)
            preds, feats = judge_eval(judge, imgs)
            acc = float((preds == sweep_labels).float().mean())
            row = {"steps": steps, "early_stop": early, "accuracy": acc,
                   "fd": frechet(feats, test_feats), "sec_per_sample": sps}
            res["steps"].append(row)
            print(f"  steps {steps:>3} early_stop={early!s:5}: acc {acc:.3f}  FD {row['fd']:8.2f}  "
                  f"{sps * 1000:.1f} ms/sample", flush=True)

    # inpainting: bottom half of every held-out digit regenerated with its true class
    n_inp = inpaint_n or (200 if quick else 1000)
    i0 = INPAINT_START[0]
    if INPAINT_PER_CLASS[0]:  # the first N (from --inpaint-start) held-out digits of every class
        idx = torch.cat([(test_y == c).nonzero().flatten()[i0:i0 + INPAINT_PER_CLASS[0]] for c in range(10)])
    else:
        idx = torch.arange(len(test_y))[i0:i0 + n_inp]
    inp_cfg = INPAINT_CFG[0] if INPAINT_CFG[0] is not None else best_cfg
    res["inpaint"] = inpaint_eval(prior, codec, judge, test_x[idx], test_y[idx], cfg=inp_cfg, steps=default_steps)
    res["inpaint"]["start"] = i0
    res["inpaint"]["per_class"] = INPAINT_PER_CLASS[0]
    res["inpaint"]["cfg"] = inp_cfg
    print(f"  inpainting (cfg {inp_cfg}): acc {res['inpaint']['accuracy']:.3f}  kept-half error "
          f"{res['inpaint']['kept_mae']:.4f} (reconstruction {res['inpaint']['recon_mae']:.4f}); "
          f"judge acc on codec round trips {res['inpaint']['recon_accuracy']:.3f}; by class "
          f"{res['inpaint']['accuracy_by_class']}", flush=True)
    _ = sample
    return res


@torch.no_grad()
def inpaint_eval(prior, codec, judge, x01: torch.Tensor, y: torch.Tensor, *, cfg: float, steps: int) -> dict:
    from comfyui_sundae.sundae_lib import sample
    from comfyui_sundae.sundae_lib.masks import token_mask_from_pixels

    images = x01 * 2 - 1  # [-1, 1]
    tokens = codec.encode(images)
    recon = to_unit(codec.decode(tokens))
    pixel_mask = torch.zeros(len(x01), 28, 28)
    pixel_mask[:, 14:, :] = 1
    mask = token_mask_from_pixels(pixel_mask, factor=codec.downsample_factor, grid=tuple(tokens.shape[-2:]))
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(0, len(x01), 100):
        out.append(sample(prior, init_tokens=tokens[i:i + 100], mask=mask[i:i + 100], labels=y[i:i + 100],
                          steps=steps, cfg_scale=cfg, generator=gen, **recorded_sampling(prior)))
    new_tokens = torch.cat(out)
    kept_tokens_equal = bool((new_tokens[~mask] == tokens[~mask]).all())
    completed = to_unit(codec.decode(new_tokens))
    preds, _ = judge_eval(judge, completed)
    recon_preds, _ = judge_eval(judge, recon)
    top = slice(0, 14)
    return {
        "accuracy": float((preds == y).float().mean()),
        "accuracy_by_class": [round(float((preds[y == c] == c).float().mean()), 4) if (y == c).any() else None
                              for c in range(10)],
        "recon_accuracy": float((recon_preds == y).float().mean()),  # codec round trip, no prior
        "kept_tokens_identical": kept_tokens_equal,
        "kept_mae": float((completed[..., top, :] - x01[..., top, :]).abs().mean()),
        "recon_mae": float((recon[..., top, :] - x01[..., top, :]).abs().mean()),
        "n": len(x01),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", action="append", help="mnist-pixels, mnist-vq or a prior file (repeatable)")
    ap.add_argument("--vqgan", default=None, help="VQ-GAN file for a --prior file (not for pixel priors)")
    ap.add_argument("--quick", action="store_true", help="20 samples per class, 200 inpaintings")
    ap.add_argument("--steps", type=int, default=50, help="steps for the accuracy / FD / inpainting runs")
    ap.add_argument("--cfg", default="1,1.5,2,3", help="comma-separated cfg scales to try")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--temperature", type=_schedule, default=None, metavar="T|START,END",
                    help="temperature schedule (default: the one the prior records)")
    ap.add_argument("--update-proportion", type=_schedule, default=None, metavar="P|START,END",
                    help="update-proportion schedule (default: the one the prior records)")
    ap.add_argument("--per-class", type=int, default=None, help="samples per class for accuracy / FD")
    ap.add_argument("--inpaint-n", type=int, default=None, help="held-out digits to inpaint")
    ap.add_argument("--inpaint-start", type=int, default=0,
                    help="first held-out digit to inpaint (to split the 1,000 over several runs)")
    ap.add_argument("--inpaint-cfg", type=float, default=None,
                    help="cfg scale for the inpainting run (default: the best scale of the sample runs)")
    ap.add_argument("--inpaint-per-class", type=int, default=None,
                    help="inpaint the first N held-out digits of every class (from --inpaint-start "
                         "within each class) instead of --inpaint-n consecutive ones")
    ap.add_argument("--no-sweep", action="store_true", help="skip the steps x early-stop sweep")
    ap.add_argument("--sweep-per-class", type=int, default=None, help="samples per class in the sweep")
    ap.add_argument("--judge-cache", default=str(REPO / "runs" / "eval_mnist_judge.pt"),
                    help="judge weights cache (trained once, deterministic; '' = always retrain)")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "eval_mnist.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    INPAINT_START[0] = args.inpaint_start
    INPAINT_CFG[0] = args.inpaint_cfg
    INPAINT_PER_CLASS[0] = args.inpaint_per_class
    if args.temperature:
        SCHEDULE_OVERRIDE["temperature"] = args.temperature
    if args.update_proportion:
        SCHEDULE_OVERRIDE["update_proportion"] = args.update_proportion
    priors = args.prior or ["mnist-pixels", "mnist-vq"]

    train_x, train_y = load_split("train_4k")
    test_x, test_y = load_split("test_1k")
    t0 = time.perf_counter()
    cache = Path(args.judge_cache) if args.judge_cache else None
    cached = cache is not None and cache.is_file()
    if cached:
        judge = Judge()
        judge.load_state_dict(torch.load(cache, weights_only=True))
        judge.eval()
    else:
        judge = train_judge(train_x, train_y)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(judge.state_dict(), cache)
    test_pred, test_feats = judge_eval(judge, test_x)
    _, train_feats = judge_eval(judge, train_x)
    judge_acc = float((test_pred == test_y).float().mean())
    real_fd = frechet(train_feats, test_feats)
    print(f"judge: held-out accuracy {judge_acc:.4f} ({'loaded from ' + str(cache) if cached else f'trained in {time.perf_counter() - t0:.0f} s'}); "
          f"real-vs-real FD (train 4k vs held-out 1k) {real_fd:.2f}", flush=True)
    report = {"judge_accuracy": judge_acc, "real_fd": real_fd, "priors": {}}
    real = {"test": (test_x, test_y), "test_feats": test_feats}
    cfg_grid = tuple(float(c) for c in args.cfg.split(","))
    for p in priors:
        print(f"\n== {p}", flush=True)
        report["priors"][p] = evaluate(p, args.vqgan, judge, real, quick=args.quick,
                                       cfg_grid=cfg_grid, default_steps=args.steps,
                                       per_class=args.per_class, sweep=not args.no_sweep,
                                       inpaint_n=args.inpaint_n, sweep_per_class=args.sweep_per_class)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    print("\n| prior | judge acc (best cfg) | acc cfg 1 | best cfg | FD | FD noise | FD real-vs-real | inpaint acc |")
    print("|---|---|---|---|---|---|---|---|")
    for p, r in report["priors"].items():
        print(f"| {p} | {r['accuracy']:.3f} | {r.get('accuracy_cfg1', float('nan')):.3f} | {r['best_cfg']} | "
              f"{r['fd']:.2f} | {r['noise_fd']:.2f} | {real_fd:.2f} | {r['inpaint']['accuracy']:.3f} |")
    print(f"\njudge held-out accuracy: {judge_acc:.4f}; JSON: {args.json}")


if __name__ == "__main__":
    main()
