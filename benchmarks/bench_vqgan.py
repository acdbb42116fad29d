"""VQ-GAN encode / decode time and peak memory, full vs tiled decode (random weights, batch 1).

Each measurement runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is
its own: the child builds the model, records its RSS, runs the operation (one warm-up and
``--repeats`` timed runs for the small cases, one timed run for megapixel ones) and reports the
wall time and the peak RSS above the post-build baseline. Prints a markdown table.

    python benchmarks/bench_vqgan.py                 # all cases
    python benchmarks/bench_vqgan.py --quick         # 256^2 cases only
    python benchmarks/bench_vqgan.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# (label, preset, image size, operation, tile tokens, overlap tokens)
CASES = [
    ("taming-f16-1024 256²", "taming-f16-1024", 256, "encode", None, None),
    ("taming-f16-1024 256²", "taming-f16-1024", 256, "decode", None, None),
    ("taming-f16-1024 256²", "taming-f16-1024", 256, "decode", 10, 2),
    ("ffhq1024-f32 1024²", "ffhq1024-f32", 1024, "encode", None, None),
    ("ffhq1024-f32 1024²", "ffhq1024-f32", 1024, "decode", None, None),
    ("ffhq1024-f32 1024²", "ffhq1024-f32", 1024, "decode", 18, 4),
    ("ffhq1024-f32 1024²", "ffhq1024-f32", 1024, "decode", 8, 2),
]


def _rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _gflop(preset: str, size: int, op: str, tile: int | None, overlap: int | None) -> float:
    """Operation count (GFLOP, multiply-add = 2) from torch's FlopCounterMode on the meta device
    (no compute): load-independent, to read the timings against. Tiled decode = the sum over
    its tiles."""
    import torch
    from comfyui_sundae.sundae_lib.vqgan import VQGAN, VQGANConfig, _tile_starts
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = VQGAN(VQGANConfig.preset(preset))
    cfg, f = model.config, model.downsample_factor
    grid = size // f
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        if op == "encode":
            model.quant_conv(
                model.encoder(torch.empty(1, cfg.in_channels, size, size, device="meta"))
            )
        else:
            sides = (
                [grid]
                if tile is None or tile >= grid
                else [min(tile, grid) for _ in _tile_starts(grid, min(tile, grid), overlap)]
            )
            for th in sides:  # square tiles: len(sides)^2 decodes of th x th tokens
                for _ in sides:
                    z = torch.empty(1, cfg.embed_dim, th, th, device="meta")
                    model.decoder(model.post_quant_conv(z))
    return counter.get_total_flops() / 1e9


def run_one(
    preset: str, size: int, op: str, tile: int | None, overlap: int | None, repeats: int
) -> dict:
    import torch
    from comfyui_sundae.sundae_lib.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.preset(preset)).eval()
    f = model.downsample_factor
    x = torch.rand(1, model.in_channels, size, size) * 2 - 1
    tokens = torch.randint(0, model.codebook_size, (1, size // f, size // f))
    params = sum(p.numel() for p in model.parameters())

    def call():
        if op == "encode":
            return model.encode(x)
        return model.decode(tokens, tile=tile, overlap=overlap)

    megapixel = size >= 1024
    baseline = _current_rss_mib()
    if not megapixel:
        call()  # warm-up (allocator, oneDNN primitive caches)
        repeats_done = repeats
    else:
        repeats_done = 1
    times = []
    for _ in range(repeats_done):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return {
        "gflop": _gflop(preset, size, op, tile, overlap),
        "shape_out": list(out.shape),
        "seconds": min(times),
        "peak_rss_mib": _rss_mib(),
        "baseline_rss_mib": baseline,
        "params_m": params / 1e6,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 256² cases")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs for small cases (min taken)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child")
    parser.add_argument(
        "--child",
        nargs=5,
        metavar=("PRESET", "SIZE", "OP", "TILE", "OVERLAP"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()

    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        preset, size, op, tile, overlap = args.child
        as_int = lambda s: None if s == "-" else int(s)  # noqa: E731
        print(
            json.dumps(run_one(preset, int(size), op, as_int(tile), as_int(overlap), args.repeats))
        )
        return

    cases = [c for c in CASES if not (args.quick and c[2] >= 1024)]
    print(
        f"# bench_vqgan: batch 1, random weights, load average {os.getloadavg()[0]:.1f}, "
        f"{os.cpu_count()} CPUs visible\n"
    )
    print(
        "| model / size | op | tile (overlap) | output | GFLOP | time s | GFLOP/s | peak RSS MiB (above model) |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|")
    for label, preset, size, op, tile, overlap in cases:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            preset,
            str(size),
            op,
            "-" if tile is None else str(tile),
            "-" if overlap is None else str(overlap),
            "--repeats",
            str(args.repeats),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(
                f"| {label} | {op} | {tile} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | |"
            )
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        tiling = "full" if tile is None else f"{tile} ({overlap})"
        if op == "encode":
            tiling = "–"
        shape = "×".join(str(s) for s in r["shape_out"])
        print(
            f"| {label} ({r['params_m']:.1f} M params) | {op} | {tiling} | {shape} | {r['gflop']:.0f} | {r['seconds']:.2f} | "
            f"{r['gflop'] / r['seconds']:.0f} | "
            f"{r['peak_rss_mib']:.0f} ({r['peak_rss_mib'] - r['baseline_rss_mib']:+.0f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
