"""End-to-end performance of comfyui-sundae on CPU or CUDA: one command, a table at the end.

Measured side by side in one process (random weights; timings do not depend on the values):

  peak       this machine's matmul peak (fp32 and bf16), and why bf16 is slow on an AVX2 CPU
  forward    prior forward per step: presets x batch x precision (fp32, bf16 autocast, bf16
             weights), FLOPs (FlopCounterMode, one forward), achieved FLOP/s vs the peak, peak
             memory, SDPA kernels used, fp32-vs-bf16 argmax agreement of the logits
  hourglass  hourglass vs flat transformer of the same width and total depth at 32x32
  sampler    `sample` time per step minus the forward time (overhead), forward batch sizes,
             100 real steps where affordable (else a few steps, extrapolated and labelled)
  checks     CFG in one forward, inference mode, host syncs per step (a dispatch-mode count;
             on CUDA also torch.cuda.set_sync_debug_mode), early stop on a peaked toy prior
             (the shrinking batch); on CUDA the cost of the prior's own token-range check
  decode     VQ-GAN decode 256^2 (taming f16) and 1024^2 (f32); with the sampler: s / image

then PASS/MISS lines for the targets and the tables. ``--write-results`` puts them into
``benchmarks/RESULTS.md`` (section "End-to-end performance (run.py)", one subsection per device).

    python benchmarks/run.py --write-results              # full CPU run (~20 min on 2 cores)
    python benchmarks/run.py --quick                      # dry run, skipped items listed
    python benchmarks/run.py --device cuda --batches 1,16 --compile   # see benchmarks/gpu.sh

Peak memory: CPU = peak RSS of this process (VmHWM, reset through /proc/self/clear_refs after
``malloc_trim`` before each measurement: it includes the weights and everything else alive),
with the part above the RSS at the measurement's start; CUDA =
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

This file is the command line; the measuring is in ``benchmarks/e2e/`` (``measure``: device,
timing, FLOPs, matmul peak; ``benches``: the sections; ``report``: targets, tables, RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from comfyui_sundae.sundae_lib import PriorConfig
from e2e.benches import (
    bench_decode,
    bench_forward,
    bench_hourglass,
    bench_sampler,
    bench_sampler_checks,
)
from e2e.measure import PRECISIONS, RESULTS, SECTIONS, Env, bench_threads, cpu_facts, measure_peaks
from e2e.report import render, targets, write_results

# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; skips the costly items")
    ap.add_argument("--presets", default="small,ffhq256,ffhq1024")
    ap.add_argument("--batches", default=None, help="default 1,8 (cpu) / 1,16 (cuda)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--main-precision", default=None,
                    help="for hourglass/sampler: default fp32 (cpu) / bf16-weights (cuda)")
    ap.add_argument("--decode-precision", default="bf16-autocast", choices=PRECISIONS,
                    help="CUDA decode precision (CPU decodes in fp32)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="the matmul peak is always measured")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--compile", nargs="?", const="all", default=None, metavar="PRESETS",
                    help="also time torch.compile'd priors (all presets, or a comma list)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode: default, reduce-overhead (CUDA graphs), ...")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--budget-s", type=float, default=None, help="timing budget per item")
    ap.add_argument("--max-forward-s", type=float, default=None,
                    help="skip forwards estimated slower than this (default 75 s, 20 quick)")
    ap.add_argument("--sample-budget-s", type=float, default=None,
                    help="run 100 real steps when they fit, else extrapolate (default 100 s)")
    ap.add_argument("--write-results", action="store_true", help=f"update {RESULTS.name}")
    ap.add_argument("--json", type=Path, default=None, help="also dump the raw results here")
    ap.add_argument("--tag", default="", help="RESULTS.md subsection suffix, e.g. 'compile'")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.presets = [p for p in args.presets.split(",") if p]
    for p in args.presets:
        PriorConfig.preset(p)  # unknown names fail here, listing the valid ones
    args.batches = [int(b) for b in (args.batches or ("1,16" if cuda else "1,8")).split(",")]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.sections = set(args.sections.split(","))
    bad = [p for p in args.precisions if p not in PRECISIONS] + [
        s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown precision/section {bad}; precisions: {PRECISIONS}, sections: "
                 f"{SECTIONS}")
    if args.compile is not None:
        args.compile = set(args.presets if args.compile == "all" else args.compile.split(","))
    args.main_precision = args.main_precision or ("bf16-weights" if cuda else "fp32")
    quick = args.quick
    args.budget_s = args.budget_s or (5.0 if quick else 30.0) if not cuda else args.budget_s or 5.0
    args.max_forward_s = args.max_forward_s or (20.0 if quick else 75.0)
    args.sample_budget_s = args.sample_budget_s or (20.0 if quick else 100.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run.py: --device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = Env(args.device, args.quick)
    t_start = time.time()
    load0 = "/".join(f"{v:.2f}" for v in os.getloadavg())
    res: dict = {"skipped": [], "cpu": cpu_facts()}
    if env.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (torch's default)
        machine = f"{torch.cuda.get_device_name(env.device)} (cc {torch.cuda.get_device_capability()})"
    else:
        machine = f"{res['cpu']['cpu']} ({os.cpu_count()} cores, {res['cpu']['capability']})"
    res["peaks"] = measure_peaks(env, "start")  # always: the forward section sizes with it
    if not env.cuda and "forward" in args.sections:
        bench_threads(env, res)
    for section, fn in (("forward", bench_forward), ("hourglass", bench_hourglass),
                        ("sampler", bench_sampler), ("checks", bench_sampler_checks),
                        ("decode", bench_decode)):
        if section in args.sections:
            fn(env, args, *((res["peaks"], res) if section == "forward" else (res,)))
    if not env.quick:
        measure_peaks(env, "end", res["peaks"])
        for r in res.get("forward", []):  # % of the final (best) peak
            r["pct_peak"] = 100 * r["gflops"] / res["peaks"]["best"][
                "fp32" if r["precision"] == "fp32" else "bf16"]
    res["targets"] = targets(env, res)
    res["meta"] = dict(command="python " + shlex.join(sys.argv),
                       date=time.strftime("%Y-%m-%d %H:%M"), machine=machine,
                       torch=torch.__version__, threads=torch.get_num_threads(),
                       load_start=load0,
                       load_end="/".join(f"{v:.2f}" for v in os.getloadavg()),
                       elapsed_min=(time.time() - t_start) / 60)
    md = render(env, args, res)
    if args.json:
        args.json.write_text(json.dumps(res, default=str, indent=1))
    if args.write_results:
        write_results(md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
