"""The ``sundae-train`` command line (click). Heavy imports (torch, ``sundae_lib``) happen inside
the commands, so ``--help`` is instant."""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .config import ConfigError, preset_names

logger = logging.getLogger("comfyui_sundae.trainer")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

GROUP_EPILOG = """\b
Examples:
  sundae-train prior --config mnist-pixels                 # MNIST pixel prior, CPU, ~30 min
  sundae-train vqgan --config mnist-vq                     # 1) small VQ-GAN (f4, 7x7 tokens)
  sundae-train latents --config mnist-vq                   # 2) encode the digits to tokens
  sundae-train prior --config mnist-vq                     # 3) class-conditional token prior
  sundae-train data emoji --out data/emoji                 # colour emoji dataset (npm packages)
  sundae-train vqgan --config emoji-vq                     # then latents / prior likewise
  torchrun --nproc_per_node=8 -m comfyui_sundae.trainer prior --config ffhq256 \\
      --set data.path=latents/ffhq256
  sundae-train sample -n 16 --class 7 --out sevens.png     # shipped MNIST models
  sundae-train inpaint --image digit.png --box 0,14,28,14 --out fixed.png
  sundae-train env                                         # versions for bug reports
"""

TRAIN_OPTIONS_HELP = f"""\b
--config takes a TOML file or a shipped preset ({", ".join(preset_names())}).
--set key.path=value overrides one setting (repeatable); values are TOML
literals (1e-4, true, [1.0, 0.7], "text"), anything else is a string.
"""


def _setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    lvl = getattr(logging, level.upper())
    if rank != 0:
        lvl = max(lvl, logging.WARNING)
    root = logging.getLogger()
    if not any(getattr(h, "_sundae", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._sundae = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(lvl)


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body: config problems -> usage errors (exit 2), bad inputs -> a one-line
    error (exit 1) instead of a traceback. ``SUNDAE_DEBUG=1`` shows tracebacks."""
    if os.environ.get("SUNDAE_DEBUG"):
        return fn()
    try:
        return fn()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from .checkpoint import DiskFullError

        # a full disk: one line (DiskFullError's text names the folder and its free space)
        raise click.ClickException(exc.strerror if isinstance(exc, DiskFullError) else str(exc)) from exc


def _overrides(sets: tuple[str, ...], **shortcuts: Any) -> list[str]:
    """``--set`` values plus shortcut options (``--out`` etc.) turned into overrides; values are
    quoted as TOML strings where needed."""
    import json

    out = list(sets)
    for key, value in shortcuts.items():
        if value is None:
            continue
        literal = json.dumps(value) if isinstance(value, str) else (str(value).lower() if isinstance(value, bool) else str(value))
        out.append(f"{key}={literal}")
    return out


def _load(stage: str, config: str | None, overrides: list[str]) -> Any:
    """Read and validate a stage config, including the library tables ([model], [loss])."""

    def body():
        from .config import load_stage, validate_model_table

        cfg, _ = load_stage(stage, config, overrides)
        if stage == "prior":
            from ..sundae_lib import PriorConfig

            validate_model_table(cfg.model, PriorConfig)
        elif stage == "vqgan":
            from ..sundae_lib import VQGANConfig
            from ..sundae_lib.vq_losses import VQLossConfig

            validate_model_table(cfg.model, VQGANConfig)
            validate_model_table(cfg.loss, VQLossConfig, section="loss")
        return cfg

    return _guard(body)


def _print_config(cfg: Any) -> None:
    from .config import config_to_dict, to_toml

    click.echo(to_toml(config_to_dict(cfg)), nl=False)


config_option = click.option(
    "--config", "-c", "config", metavar="FILE|PRESET",
    help="TOML config file or shipped preset name.",
)
set_option = click.option(
    "--set", "-s", "sets", multiple=True, metavar="KEY=VALUE",
    help="Override a config value, e.g. --set optim.lr=1e-4 (repeatable).",
)
resume_option = click.option(
    "--resume", default="auto", show_default=True, metavar="auto|never|step-N|PATH",
    help="Resume from the newest intact checkpoint in run.out_dir (auto: a damaged one is moved aside "
         "to step-N.damaged with a warning and the previous one is used), start fresh (never), a step "
         "of run.out_dir (step-N), or a checkpoint or run folder.",
)
print_option = click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")


@click.group(context_settings=CONTEXT, epilog=GROUP_EPILOG)
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.version_option(package_name="comfyui-sundae", prog_name="sundae-train")
def main(log_level: str) -> None:
    """Train VQ-GANs and SUNDAE priors, build latent datasets, sample and inpaint.

    Every training command reads one config (a TOML file or a shipped preset) plus --set
    overrides, writes checkpoints to run.out_dir and resumes from there automatically.
    Under torchrun the same commands train with DDP.
    """
    _setup_logging(log_level)


# ----------------------------------------------------------------------------------------------
# training commands
# ----------------------------------------------------------------------------------------------


def _finish(result: dict[str, Any]) -> None:
    if result.get("stopped"):
        click.echo(f"stopped by signal {result['stopped']} at step {result['step']}; checkpoint saved; "
                   "rerun the same command to resume", err=True)
        sys.exit(128 + int(result["stopped"]))
    if result.get("export"):
        click.echo(f"done: step {result['step']}, model {result['export']}")


def training_options(fn):
    """The options every training command takes (config, overrides, resume, shortcuts)."""
    opts = [
        config_option, set_option, resume_option,
        click.option("--out", metavar="DIR", help="Shortcut for --set run.out_dir=DIR."),
        click.option("--max-steps", type=int, metavar="N", help="Shortcut for --set run.max_steps=N."),
        click.option("--device", metavar="DEVICE",
                     help="Shortcut for --set run.device=... (auto, cpu, cuda, cuda:N)."),
        print_option,
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _train(stage: str, config: str | None, sets: tuple[str, ...], resume: str, out: str | None,
           max_steps: int | None, device: str | None, print_config: bool) -> None:
    """One training command: config + overrides, then ``train_<stage>`` (or the printed config)."""
    overrides = _overrides(sets, **{"run.out_dir": out, "run.max_steps": max_steps, "run.device": device})
    cfg = _load(stage, config, overrides)
    if print_config:
        return _print_config(cfg)

    def body():
        if stage == "prior":
            from .train_prior import train_prior as train
        else:
            from .train_vqgan import train_vqgan as train
        return train(cfg, resume=resume, argv=sys.argv)

    _finish(_guard(body))


@main.command(context_settings=CONTEXT, epilog=TRAIN_OPTIONS_HELP + """
\b
Examples:
  sundae-train prior --config mnist-pixels
  sundae-train prior -c mnist-pixels --set run.max_steps=500 --set optim.lr=5e-4
  sundae-train prior -c ffhq256 --set data.path=latents/ffhq256 --out runs/ffhq256
  torchrun --nproc_per_node=8 -m comfyui_sundae.trainer prior --config ffhq256 \\
      --set data.path=latents/ffhq256 --set optim.batch_size=32
  sundae-train prior -c my.toml --resume runs/x/checkpoints/step-00005000
""")
@training_options
def prior(**options) -> None:
    """Train a SUNDAE prior on a latent dataset (from 'latents') or on images with the pixel codec.

    The final weights (EMA when enabled) go to run.out_dir/run.export as a native prior file that
    load_prior and the ComfyUI loader read; it records its codec, class names and the [sampling]
    table, which become the defaults of sample(), 'sundae-train sample' and the ComfyUI sampler.
    """
    _train("prior", **options)


@main.command(context_settings=CONTEXT, epilog=TRAIN_OPTIONS_HELP + """
\b
Examples:
  sundae-train vqgan --config mnist-vq
  sundae-train vqgan -c ffhq1024 --set data.path=/data/ffhq1024 \\
      --set perceptual.lpips=vgg_lpips.pth --set perceptual.vgg=vgg16.pth
  torchrun --nproc_per_node=8 -m comfyui_sundae.trainer vqgan --config ffhq1024 \\
      --set data.path=/data/ffhq1024
""")
@training_options
def vqgan(**options) -> None:
    """Train a VQ-GAN codec (L1 + optional LPIPS + PatchGAN + codebook losses).

    Writes reconstruction grids and codebook usage to run.out_dir and the final native VQ-GAN
    file to run.out_dir/run.export.
    """
    _train("vqgan", **options)


@main.command(context_settings=CONTEXT, epilog=TRAIN_OPTIONS_HELP + """
\b
Examples:
  sundae-train latents --config mnist-vq
  sundae-train latents --vqgan vqgan_imagenet_f16_1024.ckpt --data /data/ffhq \\
      --out latents/ffhq256 --set data.resolution=256 --flip
  sundae-train latents -c imagenet256 --data /data/imagenet/train --device cuda
""")
@config_option
@set_option
@click.option("--vqgan", "vqgan_source", metavar="SOURCE", help="Shortcut for --set vqgan=SOURCE (file, folder or hf://).")
@click.option("--data", metavar="PATH", help="Shortcut for --set data.path=PATH.")
@click.option("--out", metavar="DIR", help="Shortcut for --set out_dir=DIR.")
@click.option("--flip/--no-flip", default=None, help="Also store horizontally flipped twins.")
@click.option("--device", metavar="DEVICE", help="Shortcut for --set device=...")
@print_option
def latents(config, sets, vqgan_source, data, out, flip, device, print_config) -> None:
    """Encode an image dataset with a VQ-GAN into a compact, resumable token dataset."""
    overrides = _overrides(sets, **{"vqgan": vqgan_source, "data.path": data, "out_dir": out,
                                    "data.flip": flip, "device": device})
    cfg = _load("latents", config, overrides)
    if print_config:
        return _print_config(cfg)

    def body():
        from .latents import encode_latents

        return encode_latents(cfg, argv=sys.argv)

    manifest = _guard(body)
    click.echo(f"done: {manifest['entries']} token grids {manifest['grid'][0]}x{manifest['grid'][1]} in {cfg.out_dir}")


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------


@main.group(context_settings=CONTEXT, epilog="""\b
Example:
  sundae-train data emoji --out data/emoji     # then: sundae-train vqgan --config emoji-vq
""")
def data() -> None:
    """Build training datasets from public sources, reproducibly (pinned versions, sha256)."""


def _parse_packages(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        style, sep, path = value.partition("=")
        style = style.strip().lower()
        if not sep or not style or not path.strip():
            raise click.BadParameter(f"{value!r}: expected STYLE=PATH, e.g. google=emoji-datasource-google-16.0.0.tgz")
        if style in out:
            raise click.BadParameter(f"{style!r} given twice")
        out[style] = path.strip()
    return out


@data.command("emoji", context_settings=CONTEXT, epilog="""\b
Examples:
  sundae-train data emoji --out data/emoji
  sundae-train data emoji --out data/emoji --cache ~/.cache/sundae-npm
  sundae-train data emoji --out data/emoji \\
      --packages google=emoji-datasource-google-16.0.0.tgz \\
      --packages twitter=emoji-datasource-twitter-16.0.0.tgz
  sundae-train data emoji --out data/emoji-20 --fraction 0.2 --seed 1
""")
@click.option("--out", "-o", required=True, metavar="DIR",
              help="Output folder for emoji_train.npz, emoji_test.npz and manifest.json.")
@click.option("--packages", multiple=True, metavar="STYLE=PATH", callback=_parse_packages,
              help="Read STYLE (google, twitter) from a local npm tarball (.tgz, integrity-checked) or an "
                   "unpacked package folder (not checked) instead of running npm pack (repeatable).")
@click.option("--cache", metavar="DIR", help="Where npm pack keeps the tarballs (default: OUT/npm); reused when intact.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of base emoji held out per category (all tones, both styles).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare a default build (fraction 0.1, seed 0, checked tarballs) with the pinned sha256.")
def emoji(out, packages, cache, fraction, seed, check) -> None:
    """Colour emoji, 64x64 RGB in 9 labelled categories (Noto + Twemoji, from the pinned
    emoji-datasource npm packages), with whole base emoji held out for evaluation."""

    def body():
        from .emoji import build_emoji

        return build_emoji(out, packages=packages, cache_dir=cache, fraction=fraction, seed=seed, check_sha256=check)

    manifest = _guard(body)
    files = manifest["files"]
    for name, info in files.items():
        click.echo(f"{os.path.join(out, name)}: {info['images']} images, sha256 {info['sha256']}")
    train, test = (files[n]["per_category"] for n in files)
    click.echo("per category (train/held-out): " + ", ".join(f"{c} {train[c]}/{test[c]}" for c in manifest["categories"]))
    for style, pkg in manifest["packages"].items():
        if not pkg["checked"]:
            click.echo(f"note: the {style} package was read from a folder and not integrity-checked")
    click.echo("licences: " + "; ".join(pkg["licence"] for pkg in manifest["packages"].values())
               + "; emoji-datasource code and metadata: MIT")


# ----------------------------------------------------------------------------------------------
# sampling commands
# ----------------------------------------------------------------------------------------------


def sampling_options(fn):
    opts = [
        click.option("--model", "-m", metavar="FILE|mnist-vq|mnist-pixels|emoji",
                     help="Prior file (or hf://...) or a shipped prior's name. Default: the shipped mnist-vq prior."),
        click.option("--vqgan", metavar="FILE|pixel:levels=N,channels=C",
                     help="Codec. Default: the one the prior records (found beside it or in shipped_models)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--steps", type=int, help="Sampling steps. Default (this and the options below): the "
                     "setting the prior records (sundae-train record-sampling), else the library's: 100 steps, "
                     "T 1.0,0.7, p 1.0, min-steps 10, early stop, cfg 1."),
        click.option("--temperature", "-t", metavar="T|START,END", help="Temperature (schedule)."),
        click.option("--update-proportion", "-p", metavar="P|START,END", help="Proportion of tokens updated per step."),
        click.option("--min-steps", type=int, help="Steps before early stopping may freeze a sample."),
        click.option("--early-stop/--no-early-stop", default=None, help="Freeze a sample once a step changes nothing."),
        click.option("--class", "-k", "klass", metavar="ID|NAME|null",
                     help="Class (id or label name; 'null' = unconditional). Default: sample cycles through "
                          "the classes; inpaint uses 'auto', the class under which the prior finds the kept "
                          "part most likely."),
        click.option("--cfg", "cfg_scale", type=float,
                     help="Classifier-free guidance scale (1 = off; the recorded scale is skipped for the null class)."),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Images per sampler call."),
        click.option("--device", default="auto", show_default=True),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True,
                     help="dtype the prior runs in. auto: bf16 on GPUs that have it (else fp16); on CPU "
                          "bf16 only with AMX / AVX512-BF16 measured faster (see 'env'), else fp32. "
                          "SUNDAE_CPU_DTYPE=fp32|bf16 overrides the CPU choice."),
        click.option("--compile", "compile_prior", is_flag=True, default=False,
                     help="torch.compile the prior first (inductor, frozen weights): faster steps "
                          "after a compile of tens of seconds per new shape; for many images with one "
                          "model. Needs a C++ compiler on CPUs (an error says so when none is found); if "
                          "compiling still fails, sampling goes on eagerly with a warning."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command(context_settings=CONTEXT, epilog="""\b
Examples:
  sundae-train sample -n 16 --out digits.png             # shipped mnist-vq prior
  sundae-train sample --model mnist-pixels --class 3 -n 8 --out threes.png
  sundae-train sample -m runs/ffhq256/model.safetensors --vqgan ffhq_f16.ckpt \\
      -n 64 --steps 100 -t 1.0,0.7 -p 0.5 --out samples/ --device cuda
""")
@sampling_options
@click.option("--num", "-n", type=click.IntRange(min=1), default=16, show_default=True, help="Number of images.")
@click.option("--grid", "grid_size", metavar="HxW", help="Token grid (default: the trained grid).")
@click.option("--out", "-o", default="sundae-samples.png", show_default=True,
              help="A .png path (one grid) or a folder (one PNG per image).")
def sample(num, grid_size, out, **kw) -> None:
    """Generate images from a prior and save them as PNG."""

    def body():
        from .sample_cmd import run_sample

        return run_sample(num=num, grid=grid_size, out=out, **kw)

    paths = _guard(body)
    click.echo(f"wrote {', '.join(str(p) for p in paths[:3])}{' ...' if len(paths) > 3 else ''}")


@main.command(context_settings=CONTEXT, epilog="""\b
Examples:
  sundae-train inpaint --image digit.png --box 0,14,28,14 -n 8 --out fixed.png
  sundae-train inpaint --image face.png --mask hole.png -m prior.safetensors \\
      --vqgan vqgan.ckpt --rule any --grow 1 --out filled/
  (mask PNG: white = regenerate, black = keep; any size, resized to the image)
""")
@sampling_options
@click.option("--image", "-i", required=True, type=click.Path(exists=True, dir_okay=False), help="Image to inpaint.")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), help="Mask PNG: white = regenerate.")
@click.option("--box", metavar="X,Y,W,H", help="Regenerate this pixel rectangle instead of a mask.")
@click.option("--rule", type=click.Choice(["any", "all", "coverage"]), default="any", show_default=True,
              help="Token regenerated if any / all / a share of its pixels are masked.")
@click.option("--grow", type=int, default=0, show_default=True, help="Grow the token mask by N tokens.")
@click.option("--resize", type=int, default=0, help="Resize (shorter side) + centre-crop the image to N px first.")
@click.option("--composite/--no-composite", default=True, show_default=True,
              help="Paste the original pixels back outside the mask.")
@click.option("--num", "-n", type=click.IntRange(min=1), default=4, show_default=True, help="Inpaintings to make.")
@click.option("--out", "-o", default="sundae-inpaint.png", show_default=True,
              help="A .png path (grid: original, mask, results) or a folder.")
def inpaint(image, mask, box, rule, grow, resize, composite, num, out, **kw) -> None:
    """Regenerate the masked part of an image with a prior (known tokens never change)."""
    if bool(mask) == bool(box):
        raise click.UsageError("give exactly one of --mask FILE or --box X,Y,W,H")

    def body():
        from .sample_cmd import run_inpaint

        return run_inpaint(image=image, mask=mask, box=box, rule=rule, grow=grow, resize=resize,
                           composite=composite, num=num, out=out, **kw)

    paths = _guard(body)
    click.echo(f"wrote {', '.join(str(p) for p in paths[:3])}{' ...' if len(paths) > 3 else ''}")


@main.command("convert", context_settings=CONTEXT, epilog="""\b
Examples:
  sundae-train convert runs/emoji/vqgan/emoji-vq.safetensors shipped/emoji-vq.safetensors
  sundae-train convert runs/emoji/prior/emoji.safetensors shipped/emoji.safetensors \\
      --vqgan shipped/emoji-vq.safetensors     # the prior now records the fp16 VQ-GAN
""")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="Storage dtype of the weights (loading always gives fp32 models).")
@click.option("--vqgan", metavar="FILE", help="For a prior: the VQ-GAN file it records from now on (sha256, factor, name).")
def convert(src, out, dtype, vqgan) -> None:
    """Re-save a native VQ-GAN or prior with its weights in another dtype (fp16 halves the file),
    keeping its metadata; a prior can be re-pointed at a converted VQ-GAN."""

    def body():
        from .convert import convert_model

        return convert_model(src, out, dtype=dtype, vqgan=vqgan)

    r = _guard(body)
    click.echo(f"wrote {r['out']} ({r['type']}, {r['dtype']}): {r['bytes_in'] / 1e6:.2f} MB -> "
               f"{r['bytes_out'] / 1e6:.2f} MB, largest weight change {r['max_weight_change']:.2e}, "
               f"sha256 {r['sha256']}" + (f"; codec {r['codec']}" if r["codec"] else ""))


@main.command("record-sampling", context_settings=CONTEXT, epilog="""\b
Examples:
  sundae-train record-sampling runs/emoji/prior/emoji.safetensors --steps 25 --cfg 3 -t 1.0,0.5
  sundae-train record-sampling model.safetensors          # print what the file records
""")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--steps", type=int, help="Sampling steps.")
@click.option("--temperature", "-t", metavar="T|START,END", help="Temperature (schedule).")
@click.option("--update-proportion", "-p", metavar="P|START,END", help="Proportion of tokens updated per step.")
@click.option("--min-steps", type=int, help="Steps before early stopping may freeze a sample.")
@click.option("--early-stop/--no-early-stop", default=None)
@click.option("--cfg", "cfg_scale", type=float, help="Classifier-free guidance scale (1 = off).")
def record_sampling(model, **settings) -> None:
    """Record sampling settings in a prior file: they become the defaults of sample(), the CLI
    and the ComfyUI sampler. Only the given settings change; the weights stay bit-identical.
    Without options, print what the file records."""

    def body():
        from .sample_cmd import record_sampling as run

        return run(model, **settings)

    before, after = _guard(body)
    if before == after:
        click.echo(f"{model}: {json_dumps(after)}")
    else:
        click.echo(f"{model}: {json_dumps(before)}\n  -> {json_dumps(after)}")


def json_dumps(value: Any) -> str:
    import json

    return json.dumps(value)


@main.command(context_settings=CONTEXT, epilog="""\b
Example:
  sundae-train env     # paste the output into bug reports
""")
def env() -> None:
    """Print versions (Python, torch, CUDA, einops, safetensors), devices, and what precision
    'auto' picks: the CPU's bf16 instructions, the measured bf16 / fp32 matmul speed, the choice."""
    from .sample_cmd import environment_report

    click.echo(environment_report())


if __name__ == "__main__":  # pragma: no cover
    main()
