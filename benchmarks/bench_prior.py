"""Prior forward benchmark: hourglass vs a flat transformer of the same width and block count,
fp32 vs bf16 autocast, at 16×16 and 32×32 token grids, batch 1 and 8.

One prior forward = one SUNDAE sampling step. Reports ms per step, GFLOP per step (matmuls
counted with ``torch.utils.flop_counter.FlopCounterMode``; SDPA counted analytically as
4·b·heads·n_q·n_k·e, since the counter does not see the CPU attention kernel) and the achieved
GFLOP/s against the matmul peak measured in the same run (fp32 and bf16).

Run by hand (not a test), e.g.:

    timeout 1800 python benchmarks/bench_prior.py --dim 512 --heads 8 --depth "(2, 8, 2)"

The flat baseline has ``num_blocks`` = pre + valley + post self-attention blocks (the two
resampling blocks of the hourglass are not counted). A cell whose first forward takes longer
than ``--budget`` seconds is reported from that single (cold) run, marked ``*``; a cell whose
estimated time at the measured peak exceeds ``--max-cell-seconds`` is skipped and says so
(bf16 on CPUs without AMX / AVX-512 bf16 is several times slower than fp32).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import platform
import time

import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib import PriorConfig, SundaePrior
from torch.utils.flop_counter import FlopCounterMode

# --------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_sdpa(counter: list[int]):
    """Add 4·b·heads·n_q·n_k·e FLOPs (QKᵀ and PV) per ``scaled_dot_product_attention`` call."""
    original = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        n_q, e = q.shape[-2:]
        n_k = k.shape[-2]
        batch = q.numel() // (n_q * e)
        counter[0] += 4 * batch * n_q * n_k * e
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def forward_flops(prior: SundaePrior, grid: tuple[int, int], batch: int) -> int:
    """FLOPs of one forward, counted at batch 1 and scaled (every op is linear in batch)."""
    tokens = torch.randint(0, prior.codebook_size, (1, *grid))
    sdpa = [0]
    with torch.inference_mode(), FlopCounterMode(display=False) as fc, count_sdpa(sdpa):
        prior(tokens)
    return batch * (fc.get_total_flops() + sdpa[0])


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def time_call(fn, *, budget: float, max_reps: int) -> tuple[float, int, bool]:
    """Median seconds per call: one warm-up call, then repeats until ``budget`` seconds or
    ``max_reps``. Returns (seconds, timed runs, cold) — cold when the warm-up alone exceeded
    the budget and is reported instead."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > budget:
        return first, 1, True
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], len(times), False


def matmul_peak(dtype: torch.dtype, *, budget: float) -> tuple[float, str]:
    """Best GFLOP/s over square matmuls of a few sizes, plain and as a Linear (the bf16
    autocast path goes through oneDNN linear, which can beat bf16 ``x @ y``)."""
    best, how = 0.0, ""
    sizes = (1024, 2048) if dtype == torch.float32 else (512, 1024)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        lin = torch.nn.Linear(n, n, bias=False)
        candidates = {
            f"{n}² x@y": lambda a=a.to(dtype), b=b.to(dtype): a @ b,
        }
        if dtype == torch.bfloat16:
            def autocast_linear(a=a, lin=lin):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return lin(a)
            candidates[f"{n}² autocast Linear"] = autocast_linear
        for label, fn in candidates.items():
            with torch.inference_mode():
                seconds, _, _ = time_call(fn, budget=budget, max_reps=10)
            rate = 2 * n**3 / seconds / 1e9
            if rate > best:
                best, how = rate, label
    return best, how


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=None, help="default dim // heads")
    p.add_argument("--depth", default="(2, 8, 2)", help="hourglass depth, e.g. '(2, (2, 4, 2), 2)'")
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--grids", default="16x16,32x32")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--no-resampling", action="store_true", help="attn_resampling=False")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed runs per cell")
    p.add_argument("--max-reps", type=int, default=5)
    p.add_argument("--max-cell-seconds", type=float, default=120.0,
                   help="skip a cell whose estimated time (FLOPs / measured peak) exceeds this")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    depth = ast.literal_eval(args.depth)
    base = dict(codebook_size=args.codebook, dim=args.dim, heads=args.heads,
                dim_head=args.dim_head, attn_resampling=not args.no_resampling, num_classes=0)
    hour_cfg = PriorConfig(depth=depth, **base)
    flat_cfg = PriorConfig(depth=hour_cfg.num_blocks, **base)
    device = torch.device(args.device)
    models = {
        f"hourglass {depth}": SundaePrior(hour_cfg).eval().to(device),
        f"flat {flat_cfg.depth}": SundaePrior(flat_cfg).eval().to(device),
    }
    grids = [tuple(int(v) for v in g.split("x")) for g in args.grids.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")

    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, device {device}")
    peaks = {}
    if device.type == "cpu":
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name in dtypes:
                peaks[name], how = matmul_peak(dt, budget=1.0)
                print(f"# measured {name} matmul peak: {peaks[name]:.1f} GFLOP/s ({how})")
    for name, model in models.items():
        print(f"# {name}: {model.num_parameters() / 1e6:.2f}M parameters")

    rows, results = [], {}
    for grid in grids:
        for batch in batches:
            for name, model in models.items():
                flops = forward_flops(model, grid, batch)
                tokens = torch.randint(0, args.codebook, (batch, *grid), device=device)
                for dt in dtypes:
                    label = [f"{grid[0]}×{grid[1]}", str(batch), name.split(" ")[0], dt,
                             f"{flops / 1e9:.1f}"]
                    estimate = flops / (peaks[dt] * 1e9) if peaks.get(dt) else 0.0
                    if estimate > args.max_cell_seconds:
                        rows.append(label + [f"skipped (≥ {estimate:.0f} s at peak)", "0", "-",
                                             "-"])
                        print("  " + " | ".join(rows[-1]), flush=True)
                        continue
                    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if dt == "bf16"
                           else contextlib.nullcontext())

                    def step(model=model, tokens=tokens, ctx=ctx):
                        with torch.inference_mode(), ctx:
                            model(tokens)
                        if device.type == "cuda":
                            torch.cuda.synchronize()

                    sec, reps, cold = time_call(step, budget=args.budget, max_reps=args.max_reps)
                    results[(grid, batch, name, dt)] = sec
                    rate = flops / sec / 1e9
                    peak = peaks.get(dt)
                    rows.append(label + [
                        f"{sec * 1e3:.0f}{'*' if cold else ''}", str(reps), f"{rate:.1f}",
                        f"{100 * rate / peak:.0f}%" if peak else "-",
                    ])
                    print("  " + " | ".join(rows[-1]), flush=True)

    header = ["grid", "batch", "model", "dtype", "GFLOP/step", "ms/step", "runs", "GFLOP/s",
              "% peak"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    names = list(models)
    print("| grid | batch | dtype | flat / hourglass time | bf16 / fp32 time (hourglass) |")
    print("|---|---|---|---|---|")
    for grid in grids:
        for batch in batches:
            for dt in dtypes:
                flat = results.get((grid, batch, names[1], dt))
                hour = results.get((grid, batch, names[0], dt))
                speed = f"{flat / hour:.2f}×" if flat and hour else "-"
                bf16 = results.get((grid, batch, names[0], "bf16"))
                fp32 = results.get((grid, batch, names[0], "fp32"))
                ratio = f"{bf16 / fp32:.2f}×" if bf16 and fp32 else "-"
                print(f"| {grid[0]}×{grid[1]} | {batch} | {dt} | {speed} | {ratio} |")


if __name__ == "__main__":
    main()
