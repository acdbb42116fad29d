"""Quality evaluation of the colour emoji models (run by hand; prints tables, writes JSON + PNGs).

Data: ``data/emoji/emoji_train.npz`` (6,852 images) and ``emoji_test.npz`` (710 held out by base
emoji), 64x64 RGB over white, 9 imbalanced categories. Measured:

1. VQ-GAN (also alone with ``--vqgan-only``): reconstruction PSNR of the held-out emoji, codebook
   usage on held-out and train, and the median L2 distance of training images to their own
   reconstructions (the "codec round trip" scale used by the copy rule below).
2. Judge: a small CNN trained on the training split (class-balanced sampling, seeded, cached by
   the data file's sha256); its accuracy on the held-out emoji is the reference for everything
   the judge scores. Its 128-d penultimate features give the Frechet distances (FD).
3. Guided samples (N per class, <= 25 steps, the prior's recorded settings; a --cfg sweep): judge
   accuracy, its ratio to the judge's balanced real accuracy (target >= 0.90), seconds / sample.
4. FD to the held-out emoji: samples, real train (class-balanced like the samples), decoded
   uniform noise.
5. Not copies: L2 distance of each sample to its nearest training image. Near-identical = no
   farther than the median train-image-to-its-reconstruction distance (target share <= 10%).
6. Inpainting of held-out emoji (centre 8x8 tokens, bottom half) with the true class and with the
   null class: judge accuracy relative to the same originals (target >= 0.90); kept tokens must
   be bit-identical.

    python benchmarks/eval_emoji.py                                 # everything, default models
    python benchmarks/eval_emoji.py --vqgan-only --vqgan runs/emoji/vqgan/emoji-vq.safetensors
    python benchmarks/eval_emoji.py --quick --cfg 1,2,3 --grid-out docs/images/emoji-grid.png
    python benchmarks/eval_emoji.py --device cuda --per-class 100   # on a GPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from emoji_metrics import (
    Judge,
    accuracy_report,
    copy_report,
    frechet,
    judge_eval,
    l2,
    nearest,
    train_judge,
)
from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "emoji"
JUDGE_VERSION = "emoji-judge-v1"  # bump when the judge's architecture or training changes


# ------------------------------------------------------------------------------------------
# data, files, pictures
# ------------------------------------------------------------------------------------------


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_split(path: Path) -> dict:
    """-> images float [n, 3, 64, 64] in [0, 1], labels int64 [n], names (the 9 categories)."""
    data = np.load(path)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float().div(255)
    return {"x": images.contiguous(), "y": torch.from_numpy(data["labels"].astype(np.int64)),
            "names": [str(n) for n in data["label_names"]], "path": str(path)}


def save_rows(rows: list[torch.Tensor], path: Path) -> Path:
    """Rows of images ``[n, 3, H, W]`` in [0, 1] -> one PNG, 2-px dark gaps (short rows padded)."""
    from PIL import Image

    h, w = rows[0].shape[-2:]
    cols, pad = max(len(r) for r in rows), 2
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 64, np.uint8)
    for r, row in enumerate(rows):
        arr = row.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
        for c, img in enumerate(arr.permute(0, 2, 3, 1).numpy()):
            canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def per_class_picks(y: torch.Tensor, k: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of up to ``k`` random items of every class (class order), seeded."""
    gen = torch.Generator().manual_seed(seed)
    picks = [idx[torch.randperm(len(idx), generator=gen)[:k]] for c in range(num_classes)
             if len(idx := (y == c).nonzero().flatten())]
    return torch.cat(picks)


# ------------------------------------------------------------------------------------------
# the judge (the network and the metrics: emoji_metrics.py), trained once and cached
# ------------------------------------------------------------------------------------------


def get_judge(train: dict, args, device: torch.device) -> tuple[Judge, dict]:
    """Train the judge, or load it from the cache keyed by the training file's sha256 and the
    judge settings."""
    limit = args.judge_limit or 0
    key = f"{JUDGE_VERSION}-{sha256(train['path'])[:16]}-e{args.judge_epochs}-s{args.seed}-l{limit}"
    cache = Path(args.judge_cache) / f"{key}.pt" if args.judge_cache else None
    sub = per_class_picks(train["y"], limit, len(train["names"]), args.seed) if limit else torch.arange(len(train["y"]))
    info = {"key": key, "epochs": args.judge_epochs, "train_images": len(sub), "cache": str(cache) if cache else None}
    judge = Judge(len(train["names"]))
    if cache is not None and cache.is_file():
        judge.load_state_dict(torch.load(cache, weights_only=True, map_location="cpu"))
        return judge.to(device).eval(), {**info, "cached": True}
    t0 = time.perf_counter()
    judge = train_judge(train["x"][sub], train["y"][sub], num_classes=len(train["names"]),
                        epochs=args.judge_epochs, seed=args.seed, device=device)
    info["train_seconds"] = round(time.perf_counter() - t0, 1)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in judge.state_dict().items()}, cache)
    return judge, {**info, "cached": False}


# ------------------------------------------------------------------------------------------
# models and the VQ-GAN part
# ------------------------------------------------------------------------------------------


def load_models(args, names: list[str], device: torch.device):
    """The VQ-GAN (and, unless --vqgan-only, the prior), checked against each other and the data."""
    from comfyui_sundae.sundae_lib import PriorMetadata, load_prior, load_vqgan

    codec = load_vqgan(args.vqgan).to(device).eval()
    if args.vqgan_only:
        return codec, None
    prior = load_prior(args.prior).to(device).eval()
    spec = prior.metadata.get("sundae.codec", "")
    want = dict(kv.split("=", 1) for kv in spec.split(":", 1)[-1].split(",") if "=" in kv).get("sha256")
    if want and sha256(args.vqgan) != want and not args.allow_codec_mismatch:
        raise SystemExit(f"{args.vqgan} is not the VQ-GAN the prior was trained on (sundae.codec {spec!r}); "
                         "pass the right --vqgan, or --allow-codec-mismatch to evaluate anyway")
    if codec.codebook_size != prior.codebook_size:
        raise SystemExit(f"the VQ-GAN has {codec.codebook_size} codes, the prior {prior.codebook_size}")
    if prior.num_classes != len(names):
        raise SystemExit(f"the prior has {prior.num_classes} classes, the data {len(names)} ({names})")
    label_map = PriorMetadata.of(prior, strict=True).label_map
    if label_map and list(label_map) != names:
        raise SystemExit(f"the prior's classes {label_map} differ from the data's {names}")
    return codec, prior


@torch.no_grad()
def encode(codec, x01: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    return torch.cat([codec.encode(x01[i:i + batch].to(device) * 2 - 1).cpu() for i in range(0, len(x01), batch)])


@torch.no_grad()
def decode(codec, tokens: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    """tokens [n, h, w] -> images [n, 3, H, W] in [0, 1] (float32, CPU)."""
    return torch.cat([codec.decode(tokens[i:i + batch].to(device)).float().clamp(-1, 1).add(1).div(2).cpu()
                      for i in range(0, len(tokens), batch)])


def codebook_usage(tokens: torch.Tensor, k: int) -> dict:
    """Share of the k codes used at least once, and the perplexity exp(H) of the code frequencies."""
    counts = torch.bincount(tokens.flatten(), minlength=k).double()
    p = counts[counts > 0] / counts.sum()
    return {"used_share": float((counts > 0).float().mean()), "used": int((counts > 0).sum()),
            "perplexity": float(torch.exp(-(p * p.log()).sum()))}


def vqgan_part(codec, train: dict, test: dict, args, device: torch.device,
               out: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """PSNR / usage / round-trip scale; returns the report, the held-out tokens and their
    reconstructions."""
    tokens = encode(codec, test["x"], device)
    recon = decode(codec, tokens, device)
    mse = (recon.double() - test["x"].double()).flatten(1).pow(2).mean(1)
    n_train = min(args.train_encode_n or len(train["y"]), len(train["y"]))
    train_idx = torch.randperm(len(train["y"]), generator=torch.Generator().manual_seed(args.seed))[:n_train]
    train_tokens = encode(codec, train["x"][train_idx], device)
    ref_idx = train_idx[: args.copy_ref_n]  # a seeded random subset of the training images
    ref_recon = decode(codec, train_tokens[: len(ref_idx)], device)
    ref_l2 = l2(ref_recon, train["x"][ref_idx])
    ref_mse = (ref_recon.double() - train["x"][ref_idx].double()).flatten(1).pow(2).mean(1)
    k = codec.codebook_size
    res = {
        "heldout_psnr_mean": float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean()),
        "heldout_psnr_of_mean_mse": float(10 * torch.log10(1 / mse.mean())),
        "heldout_mse_mean": float(mse.mean()), "heldout_n": len(mse),
        "train_psnr_mean": float((10 * torch.log10(1 / ref_mse.clamp_min(1e-12))).mean()),
        "usage_heldout": codebook_usage(tokens, k), "usage_train": codebook_usage(train_tokens, k),
        "usage_train_n": n_train, "codebook_size": k, "token_grid": list(tokens.shape[-2:]),
        "train_recon_l2_median": float(torch.quantile(ref_l2, 0.5)), "train_recon_l2_n": len(ref_l2),
    }
    show = per_class_picks(test["y"], 2, len(test["names"]), args.seed)
    res["picture"] = str(save_rows([test["x"][show], recon[show]], out / "vqgan_reconstructions.png"))
    return res, tokens, recon


# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------


def _schedule(text: str) -> tuple[float, float]:
    vals = [float(v) for v in text.split(",")]
    if len(vals) == 1:
        vals *= 2
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"expected START or START,END, got {text!r}")
    return tuple(vals)


def sampling_settings(prior, args) -> dict:
    """The prior's recorded settings (``SamplingDefaults.from_prior``: ``sundae.sampling``, else
    the library defaults) with the command-line overrides; steps default to the recorded number
    capped at 25."""
    from comfyui_sundae.sundae_lib import PriorMetadata, SamplingDefaults

    rec = SamplingDefaults.from_prior(prior)
    used = rec.merged(steps=args.steps or min(rec.steps, 25), temperature=args.temperature,
                      update_proportion=args.update_proportion, early_stop=False if args.no_early_stop else None)
    recorded = PriorMetadata.of(prior).sampling
    return {**used.sample_kwargs(), "recorded": recorded.to_record() if recorded is not None else {}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sampler(prior, device: torch.device, settings: dict, gen: torch.Generator, **kw) -> tuple[torch.Tensor, float]:
    """One ``sample`` call with the resolved settings; returns tokens (CPU) and seconds."""
    from comfyui_sundae.sundae_lib import sample

    opts = {k: settings[k] for k in ("steps", "temperature", "update_proportion", "early_stop", "min_steps")}
    _sync(device)
    t0 = time.perf_counter()
    tokens = sample(prior, generator=gen, **{**opts, **kw})
    _sync(device)
    return tokens.cpu(), time.perf_counter() - t0


def generate(prior, codec, labels: torch.Tensor, *, cfg: float, grid, settings: dict, seed: int,
             batch: int, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """Class-conditional samples -> images [n, 3, H, W] in [0, 1], sampler s / sample, decode s / sample."""
    gen = torch.Generator().manual_seed(seed)
    images, t_sample, t_decode = [], 0.0, 0.0
    for i in range(0, len(labels), batch):
        lab = labels[i:i + batch].to(device)
        tokens, sec = run_sampler(prior, device, settings, gen, batch_size=len(lab), grid=grid,
                                  labels=lab, cfg_scale=cfg)
        t0 = time.perf_counter()
        images.append(decode(codec, tokens, device))
        t_sample, t_decode = t_sample + sec, t_decode + time.perf_counter() - t0
    return torch.cat(images), t_sample / len(labels), t_decode / len(labels)


# ------------------------------------------------------------------------------------------
# inpainting
# ------------------------------------------------------------------------------------------


def token_masks(h: int, w: int) -> dict[str, torch.Tensor]:
    """bool [h, w], True = regenerate: the central (h/2 x w/2) box and the bottom half."""
    centre = torch.zeros(h, w, dtype=torch.bool)
    centre[h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = True
    bottom = torch.zeros(h, w, dtype=torch.bool)
    bottom[h // 2:] = True
    return {"centre": centre, "bottom": bottom}


def grey_out(x01: torch.Tensor, mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The masked input as shown: pixels under a True token painted mid-grey."""
    pix = mask.repeat_interleave(factor, 0).repeat_interleave(factor, 1)[: x01.shape[-2], : x01.shape[-1]]
    return torch.where(pix, torch.full_like(x01, 0.5), x01)


def inpaint_run(prior, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, *,
                cfg: float, settings: dict, seed: int, batch: int, device: torch.device) -> dict:
    """Regenerate ``mask`` in every token grid; ``labels`` None = the null class (label -1)."""
    gen = torch.Generator().manual_seed(seed)
    out, seconds = [], 0.0
    for i in range(0, len(tokens), batch):
        tok = tokens[i:i + batch]
        lab = torch.full((len(tok),), -1, dtype=torch.long) if labels is None else labels[i:i + batch]
        new, sec = run_sampler(prior, device, settings, gen, init_tokens=tok.to(device),
                               mask=mask.expand(len(tok), -1, -1).to(device), labels=lab.to(device),
                               cfg_scale=cfg if labels is not None else 1.0)
        out.append(new)
        seconds += sec
    new = torch.cat(out)
    keep = ~mask.expand_as(tokens)
    changed = int((new[keep] != tokens[keep]).sum())
    return {"tokens": new, "kept_tokens_changed": changed, "sec_per_image": seconds / len(tokens),
            "cfg": cfg if labels is not None else 1.0, "labels": "true class" if labels is not None else "null (-1)"}


def inpaint_part(prior, codec, judge, test: dict, tokens: torch.Tensor, recon: torch.Tensor, args, *,
                 cfg: float, settings: dict, device: torch.device, out: Path) -> dict:
    """Both masks x (true class, null class) on the first --inpaint-n held-out emoji of a seeded
    permutation; accuracies are relative to the judge on the same originals."""
    n = min(args.inpaint_n or len(tokens), len(tokens))
    idx = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(args.seed + 3))[:n]
    x, y, tok = test["x"][idx], test["y"][idx], tokens[idx]
    k = len(test["names"])
    real = accuracy_report(judge_eval(judge, x, device)[0], y, k)
    res = {"n": n, "cfg": cfg, "real": real,
           "recon": accuracy_report(judge_eval(judge, recon[idx], device)[0], y, k)}
    for name, mask in token_masks(*tok.shape[-2:]).items():
        masked = grey_out(x, mask, codec.downsample_factor)
        entry = {"masked_tokens": int(mask.sum()),
                 "masked_input": accuracy_report(judge_eval(judge, masked, device)[0], y, k)}
        rows = [x[:8], masked[:8]]
        modes = {"class": y, "null": None} if prior.has_null_class else {"class": y}
        for mode, labels in modes.items():
            run = inpaint_run(prior, tok, mask, labels, cfg=cfg, settings=settings,
                              seed=args.seed + 4, batch=args.batch, device=device)
            images = decode(codec, run.pop("tokens"), device)
            acc = accuracy_report(judge_eval(judge, images, device)[0], y, k)
            entry[mode] = {**run, **acc, "ratio": acc["accuracy"] / max(real["accuracy"], 1e-9),
                           "balanced_ratio": acc["balanced_accuracy"] / max(real["balanced_accuracy"], 1e-9)}
            rows.append(images[:8])
        entry["picture"] = str(save_rows(rows, out / f"inpaint_{name}.png"))
        res[name] = entry
    return res


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


def judge_part(judge, train: dict, test: dict, args, device: torch.device) -> tuple[dict, np.ndarray]:
    k = len(test["names"])
    preds, test_feats = judge_eval(judge, test["x"], device)
    res = accuracy_report(preds, test["y"], k)
    conf = torch.zeros(k, k, dtype=torch.long)
    conf.index_put_((test["y"], preds), torch.ones_like(preds), accumulate=True)
    res["confusion"] = conf.tolist()  # rows: true class, columns: judged class
    _, train_feats = judge_eval(judge, train["x"], device)
    res["fd_real_full_train"] = frechet(train_feats, test_feats)
    balanced = per_class_picks(train["y"], args.per_class, k, args.seed + 1)
    res["fd_real_balanced"] = frechet(train_feats[balanced.numpy()], test_feats)
    res["fd_real_balanced_n"] = len(balanced)
    return res, test_feats


def samples_part(prior, codec, judge, train: dict, test_feats: np.ndarray, report: dict, args, *,
                 settings: dict, grid, device: torch.device, out: Path) -> tuple[dict, tuple]:
    """Every --cfg value on the same noise (seeded alike): accuracy, FD, copies, timing.
    Returns the rows and (cfg, images, nearest distances, nearest indices) of the first (primary)."""
    k = len(train["names"])
    labels = torch.arange(k).repeat_interleave(args.per_class)
    real_bal = report["judge"]["balanced_accuracy"]
    threshold = report["vqgan"]["train_recon_l2_median"]
    res, primary = {}, None
    for cfg in args.cfg or [settings["cfg_scale"]]:
        if cfg != 1.0 and not prior.has_null_class:
            print(f"  cfg {cfg}: skipped (the prior has no null class)", flush=True)
            continue
        images, sps, dps = generate(prior, codec, labels, cfg=cfg, grid=grid, settings=settings,
                                    seed=args.seed + 1, batch=args.batch, device=device)
        preds, feats = judge_eval(judge, images, device)
        acc = accuracy_report(preds, labels, k)
        dist, nn_idx = nearest(images, train["x"])
        row = {**acc, "ratio_to_real_balanced": acc["accuracy"] / max(real_bal, 1e-9),
               "ratio_to_real_overall": acc["accuracy"] / max(report["judge"]["accuracy"], 1e-9),
               "fd": frechet(feats, test_feats), "sec_per_sample": sps, "decode_sec_per_sample": dps,
               "copies": copy_report(dist, threshold)}
        res[str(cfg)] = row
        primary = primary or (cfg, images, dist, nn_idx)
        print(f"  cfg {cfg:>4}: acc {row['accuracy']:.3f} (ratio {row['ratio_to_real_balanced']:.3f})  "
              f"FD {row['fd']:8.4g}  near-identical {row['copies']['near_identical_share']:.3f}  "
              f"{sps:.3f} s/sample (+{dps:.3f} decode)", flush=True)
    if primary is None:
        raise SystemExit("no --cfg value could run (cfg != 1 needs a prior with a null class)")
    return res, primary


def sample_pictures(primary, train: dict, args, out: Path) -> dict:
    cfg, images, dist, nn_idx = primary
    closest = dist.argsort()[:16]  # the most copy-like samples: the worst case
    pics = {"nearest_neighbours": str(save_rows([images[closest], train["x"][nn_idx[closest]]],
                                                out / "samples_vs_nearest_train.png")),
            "nearest_neighbours_distances": [round(float(d), 3) for d in dist[closest]]}
    cols = min(8, args.per_class)
    rows = [images[c * args.per_class:c * args.per_class + cols] for c in range(len(train["names"]))]
    pics["samples"] = str(save_rows(rows, out / "samples_per_class.png"))
    if args.grid_out:
        pics["grid_out"] = str(save_rows(rows, Path(args.grid_out)))
    return pics


def evaluate(args) -> dict:
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_split(Path(args.train)), load_split(Path(args.test))
    if train["names"] != test["names"]:
        raise SystemExit(f"label_names differ: {train['names']} vs {test['names']}")
    codec, prior = load_models(args, test["names"], device)
    report = {"settings": dict(vars(args)), "label_names": test["names"], "env": {
        "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version()}, "files": {
        name: {"path": str(p), "sha256": sha256(p)}
        for name, p in (("vqgan", args.vqgan), ("prior", None if args.vqgan_only else args.prior),
                        ("train", args.train), ("test", args.test)) if p}}
    t0 = time.perf_counter()
    report["vqgan"], tokens, recon = vqgan_part(codec, train, test, args, device, out)
    v = report["vqgan"]
    print(f"VQ-GAN: held-out PSNR {v['heldout_psnr_mean']:.2f} dB (of mean MSE {v['heldout_psnr_of_mean_mse']:.2f}); "
          f"codes used {v['usage_heldout']['used_share']:.3f} held-out, {v['usage_train']['used_share']:.3f} "
          f"train ({v['usage_train_n']} images); train round-trip L2 median {v['train_recon_l2_median']:.3f} "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    if args.vqgan_only:
        return report
    judge, report["judge_info"] = get_judge(train, args, device)
    report["judge"], test_feats = judge_part(judge, train, test, args, device)
    j, info = report["judge"], report["judge_info"]
    how = f"loaded from {info['cache']}" if info["cached"] else f"trained in {info['train_seconds']:.0f} s"
    print(f"judge: held-out accuracy {j['accuracy']:.3f}, balanced {j['balanced_accuracy']:.3f} ({how}); "
          f"FD real-vs-real {j['fd_real_balanced']:.4g} (balanced train), {j['fd_real_full_train']:.4g} (all train)",
          flush=True)
    settings = sampling_settings(prior, args)
    report["sampling"] = dict(settings)
    grid = tuple(tokens.shape[-2:])
    if grid != tuple(prior.config.grid):
        print(f"note: the VQ-GAN gives a {grid} token grid, the prior was trained on {prior.config.grid}")
    print(f"sampling: {settings['steps']} steps, T {settings['temperature']}, p {settings['update_proportion']}, "
          f"early stop {settings['early_stop']}, grid {grid}", flush=True)
    # baseline: uniform random tokens decoded, as many as there are samples per cfg
    shape = (len(test["names"]) * args.per_class, *grid)
    noise = torch.randint(0, codec.codebook_size, shape, generator=torch.Generator().manual_seed(args.seed + 2))
    report["fd_noise"] = frechet(judge_eval(judge, decode(codec, noise, device), device)[1], test_feats)
    report["samples"], primary = samples_part(prior, codec, judge, train, test_feats, report, args,
                                              settings=settings, grid=grid, device=device, out=out)
    report["primary_cfg"] = primary[0]
    report["pictures"] = sample_pictures(primary, train, args, out)
    threshold = report["vqgan"]["train_recon_l2_median"]
    report["heldout_copies"] = copy_report(nearest(test["x"], train["x"])[0], threshold)
    cfg = args.inpaint_cfg if args.inpaint_cfg is not None else primary[0]
    report["inpaint"] = inpaint_part(prior, codec, judge, test, tokens, recon, args, cfg=cfg,
                                     settings=settings, device=device, out=out)
    return report


def print_per_class(r: dict, names: list[str]) -> None:
    """Per category: judge recall on real held-out, sample accuracy (primary cfg), inpainting."""
    cols = {"real": r["judge"]["per_class"], "samples": r["samples"][str(r["primary_cfg"])]["per_class"]}
    for name in ("centre", "bottom"):
        for mode in ("class", "null"):
            if mode in r["inpaint"][name]:
                cols[f"{name}/{mode}"] = r["inpaint"][name][mode]["per_class"]
    width = max(len(n) for n in names)
    print(f"\n{'category':<{width}} | " + " | ".join(f"{c:>13}" for c in cols))
    for i, n in enumerate(names):
        cells = ("-" if v[i] is None else f"{v[i]:.3f}" for v in cols.values())
        print(f"{n:<{width}} | " + " | ".join(f"{c:>13}" for c in cells))


def _check(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "MISS")


def print_table(r: dict) -> None:
    """The compact summary: metric | value | target | PASS / MISS."""
    v = r["vqgan"]
    rows = [("VQ-GAN held-out PSNR dB (of mean MSE)",
             f"{v['heldout_psnr_mean']:.2f} ({v['heldout_psnr_of_mean_mse']:.2f})", "", None),
            ("codes used held-out / train",
             f"{v['usage_heldout']['used_share']:.3f} / {v['usage_train']['used_share']:.3f}", "", None)]
    if "judge" in r:
        s, j, h = r["samples"][str(r["primary_cfg"])], r["judge"], r["heldout_copies"]
        c = s["copies"]
        rows += [
            ("judge real acc / balanced", f"{j['accuracy']:.3f} / {j['balanced_accuracy']:.3f}", "", None),
            (f"samples acc (cfg {r['primary_cfg']}) / ratio to balanced",
             f"{s['accuracy']:.3f} / {s['ratio_to_real_balanced']:.3f}", "ratio >= 0.90",
             s["ratio_to_real_balanced"] >= 0.9),
            ("FD samples / real / noise", f"{s['fd']:.4g} / {j['fd_real_balanced']:.4g} / {r['fd_noise']:.4g}", "", None),
            ("near-identical share samples (held-out)",
             f"{c['near_identical_share']:.3f} ({h['near_identical_share']:.3f})", "<= 0.10",
             c["near_identical_share"] <= 0.1),
            ("NN distance median / p10 samples", f"{c['median']:.2f} / {c['p10']:.2f}", "", None),
            ("NN distance median / p10 held-out", f"{h['median']:.2f} / {h['p10']:.2f}", "", None),
            ("near-identical threshold (L2)", f"{v['train_recon_l2_median']:.2f}", "", None),
            ("seconds per sample (+ decode)", f"{s['sec_per_sample']:.3f} (+{s['decode_sec_per_sample']:.3f})", "", None)]
        for name in ("centre", "bottom"):
            e = r["inpaint"][name]
            for mode in ("class", "null"):
                if mode in e:
                    rows.append((f"inpaint {name} {mode}: acc / ratio", f"{e[mode]['accuracy']:.3f} / "
                                 f"{e[mode]['ratio']:.3f}", "ratio >= 0.90", e[mode]["ratio"] >= 0.9))
            changed = sum(e[m]["kept_tokens_changed"] for m in ("class", "null") if m in e)
            rows.append((f"inpaint {name}: kept tokens changed", str(changed), "0", changed == 0))
    w = [max(len(str(row[i])) for row in rows) for i in range(3)]
    print(f"\n{'metric':<{w[0]}} | {'value':<{w[1]}} | {'target':<{w[2]}} |")
    for a, b, t, ok in rows:
        print(f"{a:<{w[0]}} | {b:<{w[1]}} | {t:<{w[2]}} | {_check(ok)}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vqgan", default=str(REPO / "shipped_models" / "vqgan" / "emoji-vq.safetensors"),
                    help="VQ-GAN file (default: the shipped emoji-vq)")
    ap.add_argument("--prior", default=str(REPO / "shipped_models" / "sundae" / "emoji.safetensors"),
                    help="class-conditional prior file (default: the shipped emoji prior)")
    ap.add_argument("--train", default=str(DATA / "emoji_train.npz"), help="training split (.npz)")
    ap.add_argument("--test", default=str(DATA / "emoji_test.npz"), help="held-out split (.npz)")
    ap.add_argument("--out", default=str(REPO / "out" / "eval_emoji"), help="results.json and the PNGs")
    ap.add_argument("--grid-out", default=None, help="also save the samples grid (9 rows x 8) here")
    ap.add_argument("--vqgan-only", action="store_true", help="only the VQ-GAN part (no judge, no prior)")
    ap.add_argument("--quick", action="store_true",
                    help="10 samples per class, 90 inpaintings, 1,000 training images for code usage")
    ap.add_argument("--seed", type=int, default=0, help="seeds the judge, samples, noise and subsets")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (models, judge and sampler)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--batch", type=int, default=50, help="sampler batch size")
    ap.add_argument("--per-class", type=int, default=None, help="samples per class (default 50)")
    ap.add_argument("--steps", type=int, default=None, help="default: the prior's recorded steps, at most 25")
    ap.add_argument("--cfg", default=None, help="comma-separated cfg scales (default: the recorded one); "
                    "the first is the primary (pictures, inpainting)")
    ap.add_argument("--temperature", type=_schedule, default=None, metavar="T|START,END",
                    help="temperature schedule (default: the recorded one)")
    ap.add_argument("--update-proportion", type=_schedule, default=None, metavar="P|START,END",
                    help="update-proportion schedule (default: the recorded one)")
    ap.add_argument("--no-early-stop", action="store_true", help="run every step (default: as recorded)")
    ap.add_argument("--inpaint-n", type=int, default=None, help="held-out emoji to inpaint (default all)")
    ap.add_argument("--inpaint-cfg", type=float, default=None, help="default: the primary cfg")
    ap.add_argument("--train-encode-n", type=int, default=None, help="training images for code usage (default all)")
    ap.add_argument("--copy-ref-n", type=int, default=500,
                    help="training images whose round-trip distance sets the near-identical threshold")
    ap.add_argument("--judge-epochs", type=int, default=6, help="judge epochs (of len(train) balanced draws)")
    ap.add_argument("--judge-limit", type=int, default=None,
                    help="train the judge on at most this many images per class (smoke runs)")
    ap.add_argument("--judge-cache", default=str(REPO / "runs" / "eval_emoji_judge"), help="folder; '' = always retrain")
    ap.add_argument("--allow-codec-mismatch", action="store_true",
                    help="evaluate although the prior records another VQ-GAN's sha256")
    args = ap.parse_args(argv)
    args.cfg = [float(c) for c in args.cfg.split(",")] if args.cfg else None
    if args.per_class is None:
        args.per_class = 10 if args.quick else 50
    if args.quick:
        args.inpaint_n = args.inpaint_n or 90
        args.train_encode_n = args.train_encode_n or 1000
        args.copy_ref_n = min(args.copy_ref_n, 200)
    return args


def main(argv=None) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate(args)
    report["seconds_total"] = round(time.perf_counter() - t0, 1)
    path = Path(args.out) / "results.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    if "judge" in report:
        print_per_class(report, report["label_names"])
    print_table(report)
    print(f"\nJSON: {path}; pictures in {args.out}")
    inpaint = report.get("inpaint", {})
    changed = [(m, mode, inpaint[m][mode]["kept_tokens_changed"]) for m in ("centre", "bottom") if m in inpaint
               for mode in ("class", "null") if mode in inpaint[m]]
    if any(c for *_, c in changed):
        raise SystemExit(f"FAIL: inpainting changed kept tokens: {changed}")


if __name__ == "__main__":
    main()
