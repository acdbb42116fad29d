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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from comfyui_sundae.sundae_lib import VQGAN, PriorConfig, SundaePrior, VQGANConfig, sample
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## End-to-end performance (run.py)"
PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")
# prior preset -> VQ-GAN preset ("tiny" pairs only serve quick checks of this script)
CODEC_FOR = {"ffhq256": "taming-f16-1024", "ffhq1024": "ffhq1024-f32", "tiny": "tiny"}
BF16 = ("bf16-autocast", "bf16-weights")
SECTIONS = ("forward", "hourglass", "sampler", "checks", "decode")


def log(msg: str) -> None:
    print(f"[run.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# device, memory, timing, FLOPs
# ------------------------------------------------------------------------------------------


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Env:
    """The device of the run: synchronisation, peak memory, timing."""

    def __init__(self, device: str, quick: bool):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.quick = quick
        self.hwm_resettable = False
        self.rss0 = 0.0
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._libc is not None:  # hand freed heap pages back, so RSS = live memory
            self._libc.malloc_trim(0)
        try:  # "5" resets the peak RSS (VmHWM) of this process to the current RSS
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.hwm_resettable = True
        except OSError:
            self.hwm_resettable = False
        self.rss0 = _proc_kb("VmRSS") / 1024

    def peak_mib(self) -> tuple[float, float]:
        """(peak, peak minus the memory in use at ``reset_peak``) in MiB."""
        if self.cuda:
            return (torch.cuda.max_memory_allocated(self.device) / 2**20,
                    (torch.cuda.max_memory_allocated(self.device)
                     - torch.cuda.memory_allocated(self.device)) / 2**20)
        peak = _proc_kb("VmHWM") / 1024
        return peak, peak - self.rss0

    def timed(self, fn, *, warmup: int, repeats: int, budget_s: float):
        """Median seconds of ``fn()`` (synchronised), all times, and the last output. Stops
        repeating once ``budget_s`` is spent (at least one timed run)."""
        out = None
        for _ in range(warmup):
            out = fn()
        times: list[float] = []
        while len(times) < repeats:
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
            if sum(times) > budget_s:
                break
        return statistics.median(times), times, out


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA SDPA kernels but not the CPU one: count it like them
_FLOP_EXTRA = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _FLOP_EXTRA[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default] = _sdpa_cpu_flops


def count_flops(fn):
    """(FLOPs of one call of ``fn``, its output): matmuls, convolutions and attention."""
    with FlopCounterMode(display=False, custom_mapping=_FLOP_EXTRA) as counter:
        out = fn()
    return counter.get_total_flops(), out


def sdpa_kernels(fn) -> tuple[str, object]:
    """Which scaled-dot-product-attention kernels one call of ``fn`` ran (profiler op names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    counts: dict[str, int] = {}
    for ev in prof.events():
        if ev.name.startswith("aten::_scaled_dot_product") or ev.name.startswith("aten::_flash"):
            name = ev.name.removeprefix("aten::_scaled_dot_product_")
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none seen", out


def autocast_ctx(env: Env, precision: str):
    if precision == "bf16-autocast":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_in(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16-weights" else model


def build_prior(env: Env, name: str, **overrides) -> SundaePrior:
    torch.manual_seed(0)
    return SundaePrior(PriorConfig.preset(name, **overrides)).eval().to(env.device)


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The same module with its forward compiled (attributes stay reachable for ``sample``)."""
    for knob in ("recompile_limit", "cache_size_limit"):  # batch sizes x model instances
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    twin = copy.copy(model)  # shares parameters; only the forward attribute differs
    twin.forward = torch.compile(model.forward, mode=None if mode == "default" else mode)
    return twin


# ------------------------------------------------------------------------------------------
# peak matmul rate
# ------------------------------------------------------------------------------------------


def cpu_facts() -> dict:
    flags: set[str] = set()
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx_vnni")
    return {
        "cpu": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "flags": {f: f in flags for f in wanted},
        "threads": torch.get_num_threads(),
    }


def measure_peaks(env: Env, when: str, peaks: dict | None = None) -> dict:
    """Best GFLOP/s per dtype over a few GEMM call paths (fastest of the repeats: a peak). Run
    at the start and again at the end, since a shared machine's load moves."""
    big = 8192 if env.cuda else (1536 if env.quick else 2048)
    tok = 16 * 1024 if env.cuda else 1024  # tokens of a 32x32 grid (x16 batch on CUDA)
    ff = (tok, 1024, 4096)  # the prior's feed-forward GEMM at width 1024: [m, k] x [k, n]
    ff256 = (tok // 4, 1024, 4096)  # the same at 16x16 (ffhq256, or the valley of ffhq1024)
    variants = [  # (dtype key, label, (m, k, n), dtype, how); mm is a @ b.T
        ("fp32", "mm", (big,) * 3, torch.float32, "mm"),
        ("fp32", "F.linear, FF shape", ff, torch.float32, "linear"),
        ("fp32", "F.linear, FF shape", ff256, torch.float32, "linear"),
        ("bf16", "mm", (big if env.cuda else 512,) * 3, torch.bfloat16, "mm"),
        ("bf16", "F.linear", (big,) * 3, torch.bfloat16, "linear"),
        ("bf16", "F.linear, FF shape", ff, torch.bfloat16, "linear"),
        ("bf16", "F.linear, FF shape", ff256, torch.bfloat16, "linear"),
        ("bf16", "autocast F.linear (fp32 in), FF shape", ff, torch.float32, "autocast"),
    ]
    peaks = peaks or {"rows": [], "best": {"fp32": 0.0, "bf16": 0.0},
                      "tf32": torch.backends.cuda.matmul.allow_tf32}
    gen = torch.Generator(device=env.device).manual_seed(0)
    for key, label, (m, k, n), dtype, how in variants:
        a = torch.randn(m, k, device=env.device, dtype=dtype, generator=gen)
        b = torch.randn(n, k, device=env.device, dtype=dtype, generator=gen)

        def fn(a=a, b=b, how=how):
            if how == "mm":
                return a @ b.T
            with autocast_ctx(env, "bf16-autocast" if how == "autocast" else "fp32"):
                return torch.nn.functional.linear(a, b)

        _, times, _ = env.timed(fn, warmup=1, repeats=20 if env.cuda else 4, budget_s=3.0)
        gflops = 2 * m * k * n / min(times) / 1e9
        peaks["best"][key] = max(peaks["best"][key], gflops)
        peaks["rows"].append((key, label, when, f"{m}x{k}x{n}", min(times) * 1e3, gflops))
        log(f"peak ({when}) {key} {label} {m}x{k}x{n}: {gflops:.1f} GFLOP/s")
        del a, b
    return peaks


def bench_threads(env: Env, res: dict) -> None:
    """CPU: ``small`` b1 forward with 1 thread vs all, interleaved. On a shared, oversubscribed
    machine OpenMP regions wait for descheduled threads, and small ops suffer most."""
    model, n = build_prior(env, "small"), torch.get_num_threads()
    most = max(n, os.cpu_count() or 1)
    x = torch.randint(0, model.codebook_size, (1, *model.config.grid))
    times: dict[int, list[float]] = {1: [], most: []}

    def fn():
        with torch.inference_mode():
            return model(x)

    for _ in range(2):
        for t in times:
            torch.set_num_threads(t)
            times[t] += env.timed(fn, warmup=1, repeats=2, budget_s=5)[1]
    torch.set_num_threads(n)
    res["threads"] = {t: statistics.median(v) * 1e3 for t, v in times.items()}
    log(f"threads: small b1 forward {res['threads']} ms")


# ------------------------------------------------------------------------------------------
# prior forward
# ------------------------------------------------------------------------------------------


def bench_forward(env: Env, args, peaks: dict, res: dict) -> None:
    rows, agree = res.setdefault("forward", []), res.setdefault("agreement", [])
    for name in args.presets:
        log(f"forward: building {name}")
        model = build_prior(env, name)
        cfg = model.config
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.codebook_size, (max(args.batches), *cfg.grid), generator=gen)
        tokens = tokens.to(env.device)
        with torch.inference_mode():
            flops1, _ = count_flops(lambda m=model, x=tokens[:1]: m(x))
        res.setdefault("flops", {})[name] = flops1
        res.setdefault("params", {})[name] = model.num_parameters()
        argmax: dict = {}
        diag: dict = {}  # fp32 median top-1/top-2 logit gap; median |bf16 - fp32| logit
        ref = None
        for precision in args.precisions:
            m_eager = model_in(model, precision)
            variants = [("eager", m_eager)]
            if args.compile and name in args.compile and precision == args.main_precision:
                variants.append(("compiled", compiled(m_eager, args.compile_mode)))
            rate = None  # measured GFLOP/s at the smallest batch, to size the larger ones
            for label, m in variants:
                for b in sorted(args.batches):
                    x = tokens[:b]
                    est = flops1 * b / ((rate or 0.4 * peaks["best"]["fp32" if precision == "fp32"
                                                                        else "bf16"]) * 1e9)
                    why = skip_forward(env, args, name, b, precision,
                                       0.0 if b == min(args.batches) else est)
                    if why:
                        res["skipped"].append(f"forward {name} b{b} {precision} {label}: {why}")
                        continue

                    def fn(m=m, x=x, precision=precision):  # as the sampler calls it
                        with torch.inference_mode(), autocast_ctx(env, precision):
                            return m(x, validate=False)

                    first_s, kernels = None, ""
                    env.reset_peak()
                    if b == min(args.batches):  # warm up (and compile), and see the SDPA kernels
                        env.sync()
                        t0 = time.perf_counter()
                        kernels, out = sdpa_kernels(fn)
                        kernels = kernels if label == "eager" else ""  # compiling runs SDPA too
                        env.sync()
                        first_s = time.perf_counter() - t0
                    slow = not env.cuda and label == "eager" and (first_s or est) > args.budget_s
                    if slow and first_s:  # one cold forward costs the whole budget: keep it
                        med, times = first_s, [first_s]
                    else:
                        repeats = (3 if env.quick else 20) if env.cuda else (2 if env.quick else 5)
                        med, times, out = env.timed(fn, warmup=0 if slow or first_s else 1,
                                                    repeats=repeats, budget_s=args.budget_s)
                    gflops = flops1 * b / med / 1e9
                    rate = rate or gflops
                    peak = peaks["best"]["fp32" if precision == "fp32" else "bf16"]
                    rows.append(dict(preset=name, batch=b, precision=precision, variant=label,
                                     ms=med * 1e3, runs=len(times), gflop=flops1 * b / 1e9,
                                     gflops=gflops, pct_peak=100 * gflops / peak if peak else 0,
                                     mem_mib=env.peak_mib(), kernels=kernels,
                                     first_call_s=first_s))
                    log(f"forward {name} b{b} {precision} {label}: {med * 1e3:.1f} ms "
                        f"({gflops:.1f} GFLOP/s, {len(times)} runs)")
                    if label == "eager":
                        argmax[(precision, b)] = out.float().argmax(-1)
                        if b == min(args.batches):
                            if precision == "fp32":
                                ref = out.float()
                                top2 = ref.topk(2, dim=-1).values
                                diag["gap"] = (top2[..., 0] - top2[..., 1]).median().item()
                            elif ref is not None:
                                diag[precision] = (out.float() - ref).abs().median().item()
                            g = torch.Generator(device=env.device).manual_seed(2)
                            u = torch.rand(out.shape, device=env.device, generator=g)
                            gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
                            argmax[(precision, b, "sampled")] = (out.float() + gumbel).argmax(-1)
                            del u, gumbel
                    del out
            del m_eager, variants
        for (precision, *rest), toks in argmax.items():
            ref = argmax.get(("fp32", *rest))
            if precision != "fp32" and ref is not None:
                agree.append(dict(preset=name, precision=precision, batch=rest[0],
                                  kind="sampled T=1, shared noise" if rest[1:] else "argmax",
                                  pct=100 * (toks == ref).float().mean().item(),
                                  gap=diag.get("gap"), dlogit=diag.get(precision)))
        del model, argmax, ref
        gc.collect()


def skip_forward(env: Env, args, name: str, b: int, precision: str, est: float) -> str:
    if env.quick and name == "ffhq1024" and b > 1:
        return "--quick skips ffhq1024 batch > 1"
    if env.quick and name == "ffhq1024" and precision == "bf16-weights" and not env.cuda:
        return "--quick skips ffhq1024 bf16-weights on CPU (~same as bf16 autocast)"
    if est > args.max_forward_s:  # (the smallest batch is always measured: est = 0)
        return f"estimated {est:.0f} s per forward > --max-forward-s {args.max_forward_s:g}"
    return ""


def bench_hourglass(env: Env, args, res: dict) -> None:
    """ffhq1024 (2, 12, 2) hourglass vs a flat stack of 16 blocks, same width, at 32x32 (or
    the last preset given, if ffhq1024 is not among them); also the hourglass without the
    attention-resampling blocks (whose up block runs a feed-forward at full resolution)."""
    name = "ffhq1024" if "ffhq1024" in args.presets else args.presets[-1]
    precision = args.main_precision
    hour = model_in(build_prior(env, name), precision)
    models = {"hourglass": hour,
              "hourglass, no attn resampling": model_in(
                  build_prior(env, name, attn_resampling=False), precision),
              "flat": model_in(build_prior(env, name, depth=hour.config.num_blocks), precision)}
    rows = res.setdefault("hourglass", [])
    batches = sorted({1, max(args.batches)}) if env.cuda else [1]
    for b in batches:
        x = torch.randint(0, hour.codebook_size, (b, 32, 32), device=env.device)
        fns = {}
        for label, m in models.items():
            def fn(m=m, x=x):
                with torch.inference_mode(), autocast_ctx(env, precision):
                    return m(x, validate=False)

            with torch.inference_mode():
                flops, _ = count_flops(fn)  # doubles as warm-up
            fns[label] = (fn, flops, m)
        times: dict[str, list[float]] = {label: [] for label in models}
        rounds = (5 if env.quick else 20) if env.cuda else (1 if env.quick else 3)
        for _ in range(rounds):  # interleaved, so load changes hit both alike
            for label, (fn, _, _) in fns.items():
                times[label] += env.timed(fn, warmup=0, repeats=1, budget_s=0)[1]
        for label, (_, flops, m) in fns.items():
            med = statistics.median(times[label])
            depth = m.config.depth
            rows.append(dict(model=label, depth=str(depth), batch=b, precision=precision,
                             ms=med * 1e3, runs=len(times[label]), gflop=flops / 1e9,
                             params_m=m.num_parameters() / 1e6))
            log(f"hourglass-vs-flat {label} b{b}: {med * 1e3:.1f} ms")
    del hour, models


# ------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from the callback to end a sampling run after a few timed steps."""


class ForwardProbe:
    """Replaces ``model.forward`` to record every forward the sampler makes: batch size,
    time (CPU clock, or CUDA events: no extra sync), inference mode. ``transform(tokens,
    logits)`` may replace the logits (the peaked toy prior)."""

    def __init__(self, model: torch.nn.Module, env: Env, transform=None):
        self.model, self.env, self.transform = model, env, transform
        self.orig = model.forward
        self.own = model.__dict__.get("forward")  # a compiled twin has its own forward
        self.force: dict = {}  # keyword arguments forced onto every forward (what-if runs)
        self.batches: list[int] = []
        self.inference: list[bool] = []
        self.spans: list = []
        model.forward = self

    def __call__(self, tokens, labels=None, **kwargs):
        if self.env.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        else:
            t0 = time.perf_counter()
        out = self.orig(tokens, labels, **{**kwargs, **self.force})
        if self.transform is not None:
            out = self.transform(tokens, out)
        if self.env.cuda:
            end.record()
            self.spans.append((start, end))
        else:
            self.spans.append(time.perf_counter() - t0)
        self.batches.append(int(tokens.shape[0]))
        self.inference.append(torch.is_inference_mode_enabled())
        return out

    def seconds(self) -> list[float]:
        if self.env.cuda:
            self.env.sync()
            return [s.elapsed_time(e) / 1e3 for s, e in self.spans]
        return list(self.spans)

    def close(self) -> None:
        if self.own is None:
            del self.model.forward  # back to the class's forward
        else:
            self.model.forward = self.own


def run_sampler(env: Env, model, *, batch: int, steps: int, early_stop: bool, precision: str,
                stop_after: int | None = None, transform=None, force=None, **kwargs) -> dict:
    """One ``sample`` call, instrumented. ``stop_after``: cancel after that many steps (the
    per-step time is then extrapolated to ``steps``). ``force``: keyword arguments forced onto
    every forward."""
    probe = ForwardProbe(model, env, transform)
    probe.force = dict(force or {})
    stamps: list[float] = []

    def callback(step, total, tokens):
        env.sync()
        stamps.append(time.perf_counter())
        if stop_after is not None and step >= stop_after:
            raise _Stop

    gen = torch.Generator(device=env.device).manual_seed(3)
    cb = callback if (stop_after is not None or not env.cuda) else None
    env.reset_peak()
    env.sync()
    t0 = time.perf_counter()
    try:
        with autocast_ctx(env, precision):
            sample(model, batch_size=batch, steps=steps, early_stop=early_stop, generator=gen,
                   callback=cb, **kwargs)
    except _Stop:
        pass
    env.sync()
    wall = time.perf_counter() - t0
    probe.close()
    fwd = probe.seconds()
    n = len(probe.batches) if cb is None else len(stamps)
    out = dict(batch=batch, steps=steps, early_stop=early_stop, steps_run=n, wall_s=wall,
               forwards=len(probe.batches), batches=probe.batches, mem_mib=env.peak_mib(),
               inference=all(probe.inference))
    if stop_after is not None and len(stamps) >= 2:  # steps 2..k: no first-call effects
        per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        per_fwd = statistics.median(fwd[1:])
        out.update(extrapolated=True, step_s=per_step, fwd_s=per_fwd,
                   total_s=(stamps[0] - t0) + (steps - 1) * per_step)
    else:
        out.update(extrapolated=False, step_s=wall / max(n, 1), fwd_s=sum(fwd) / max(n, 1),
                   total_s=wall)
    out["overhead_pct"] = 100 * (out["step_s"] - out["fwd_s"]) / out["step_s"]
    return out


def bench_sampler(env: Env, args, res: dict) -> None:
    precision = args.main_precision
    fwd_ms = {(r["preset"], r["batch"]): r["ms"] for r in res.get("forward", [])
              if r["precision"] == precision and r["variant"] == "eager"}
    rows = res.setdefault("sampler", [])
    for name in args.presets:
        model = model_in(build_prior(env, name), precision)
        variants = [("eager", model)]
        if args.compile and name in args.compile:
            variants.append(("compiled", compiled(model, args.compile_mode)))
        for label, m in variants:
            for b in sorted(args.batches):
                est_step = fwd_ms.get((name, b), float("nan")) / 1e3 * 1.05
                if env.quick and name == "ffhq1024" and b > 1:
                    res["skipped"].append(f"sampler {name} b{b}: --quick skips ffhq1024 b > 1")
                    continue
                if est_step > args.max_forward_s:
                    res["skipped"].append(f"sampler {name} b{b}: forward ~{est_step:.0f} s")
                    continue
                # 100 real steps when they fit the budget (early stop on = the default; also
                # off when that fits twice), else a few steps extrapolated
                est = est_step * args.steps
                full = env.cuda or est <= args.sample_budget_s
                modes = ((False, True) if env.cuda or est <= args.sample_budget_s / 2 else
                         (True,)) if full and label == "eager" else (False,)
                if label == "compiled":  # compile for this batch size outside the timing
                    with autocast_ctx(env, precision):
                        sample(m, batch_size=b, steps=2, early_stop=False,
                               generator=torch.Generator(device=env.device).manual_seed(0))
                for es in modes:
                    log(f"sampler {name} b{b} {label} early_stop={es} "
                        f"({'full' if full else 'extrapolated'})")
                    r = run_sampler(env, m, batch=b, steps=args.steps, early_stop=es,
                                    precision=precision,
                                    stop_after=None if full else
                                    (2 if env.quick or est_step > 10 else 3))
                    rows.append(dict(r, preset=name, variant=label, precision=precision))
        del model, variants
        gc.collect()


def bench_sampler_checks(env: Env, args, res: dict) -> None:
    """CFG in one forward, host syncs per step, early stop on a converged (peaked) toy."""
    checks = res.setdefault("sampler_checks", {})
    small = build_prior(env, "small")
    target = torch.randint(0, small.codebook_size, small.config.grid, device=env.device,
                           generator=torch.Generator(device=env.device).manual_seed(5))

    def peaked(tokens, logits):  # a "converged" prior: 0.01 x network + 20 x onehot(target)
        hot = torch.nn.functional.one_hot(target, logits.shape[-1]).to(logits.dtype)
        return logits * 0.01 + 20.0 * hot

    # host syncs: aten ops that read device values on the host (they block on a GPU), counted
    # per step on the peaked toy (so samples freeze); on CUDA also set_sync_debug_mode's count
    steps, min_steps = 20, 10
    counter = SyncCounter()
    probe = ForwardProbe(small, env, peaked)
    with counter, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if env.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            sample(small, batch_size=2, steps=steps, min_steps=min_steps, early_stop=True,
                   update_proportion=0.3, callback=lambda step, total, t: counter.mark(step),
                   generator=torch.Generator(device=env.device).manual_seed(4))
        finally:
            if env.cuda:
                torch.cuda.set_sync_debug_mode("default")
    probe.close()
    cuda_syncs = [w for w in caught if "synchroniz" in str(w.message)]
    checks["syncs"] = dict(per_step=counter.per_step(len(probe.batches)), min_steps=min_steps,
                           where=counter.where_summary(), batches=probe.batches,
                           cuda_warnings=len(cuda_syncs),
                           cuda_where=sorted({f"{Path(w.filename).name}:{w.lineno}"
                                              for w in cuda_syncs}))

    cond = build_prior(env, "small", num_classes=10)
    counter = SyncCounter()
    with counter:
        r = run_sampler(env, cond, batch=2, steps=4, early_stop=False, precision="fp32",
                        labels=torch.tensor([3, 7]), cfg_scale=3.0)
    checks["cfg"] = dict(steps=r["steps_run"], forwards=r["forwards"], batches=r["batches"],
                         syncs=counter.where_summary())

    b = 4 if env.quick else 8
    # early stop off keeps the batch constant: extrapolate it when 100 steps would not fit
    est = [r["ms"] / 1e3 * args.steps for r in res.get("forward", []) if r["preset"] == "small"
           and r["batch"] == b and r["precision"] == "fp32" and r["variant"] == "eager"]
    real_off = env.cuda or (not env.quick and bool(est) and est[0] <= args.sample_budget_s)
    toy = {}
    for es in (False, True):
        toy[es] = run_sampler(env, small, batch=b, steps=args.steps, early_stop=es,
                              precision="fp32", transform=peaked, update_proportion=0.3,
                              stop_after=None if es or real_off else 3)
        log(f"peaked toy early_stop={es}: {toy[es]['total_s']:.2f} s, {toy[es]['forwards']} fwd")
    checks["toy"] = toy
    del cond, small, probe
    if env.cuda:  # what one host sync per step costs: the prior's range checks forced on
        name = "ffhq1024" if "ffhq1024" in args.presets else args.presets[-1]
        model = model_in(build_prior(env, name), args.main_precision)
        times: dict[str, list[float]] = {"sampler default": [], "validate=True forced": []}
        for _ in range(2):
            for label in times:
                r = run_sampler(env, model, batch=1, steps=args.steps, early_stop=False,
                                precision=args.main_precision,
                                force={"validate": True} if "forced" in label else None)
                times[label].append(r["step_s"])
        checks["token_check"] = dict(preset=name, **{k: min(v) for k, v in times.items()})
        del model


class SyncCounter(TorchDispatchMode):
    """Counts aten ops that copy a device value to the host (``item``/``bool``/``int``,
    ``nonzero``, boolean-mask indexing, ``masked_select``): on a GPU each one waits for the
    queue to drain. On the CPU it is a proxy; ``torch.tensor(list, device=cuda)`` copies are not
    seen here (CUDA's sync debug mode sees them)."""

    SYNCING = {"is_nonzero", "item", "_local_scalar_dense", "tolist", "nonzero", "masked_select",
               "unique", "_unique2"}  # seen before decomposition under inference mode

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, str]] = []
        self.step = 0

    def mark(self, step: int) -> None:
        self.step = step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in self.SYNCING or bool_index:
            self.events.append((self.step, f"{name} at {_caller()}"))
        return func(*args, **(kwargs or {}))

    def per_step(self, steps: int) -> list[int]:
        return [sum(1 for s, _ in self.events if s == i) for i in range(steps)]

    def where_summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, where in self.events:
            out[where] = out.get(where, 0) + 1
        return out


def _caller() -> str:
    """file:line of the innermost frame in sundae_lib (where the host read happens)."""
    frame = sys._getframe(2)
    while frame is not None:
        if "sundae_lib" in frame.f_code.co_filename:
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


# ------------------------------------------------------------------------------------------
# VQ-GAN decode
# ------------------------------------------------------------------------------------------


def bench_decode(env: Env, args, res: dict) -> None:
    rows = res.setdefault("decode", [])
    precision = "fp32" if not env.cuda else args.decode_precision
    for name in [p for p in args.presets if p in CODEC_FOR]:
        codec = CODEC_FOR[name]
        torch.manual_seed(0)
        vq = model_in(VQGAN(VQGANConfig.preset(codec)).eval().to(env.device), precision)
        h, w = PriorConfig.preset(name).grid
        for b in sorted(args.batches) if env.cuda else [1]:
            px = h * vq.downsample_factor
            if env.quick and px >= 1024 and not env.cuda:
                res["skipped"].append(f"decode {codec} {px}^2: --quick skips it (~1 min on CPU)")
                continue
            x = torch.randint(0, vq.codebook_size, (b, h, w), device=env.device)

            def fn(vq=vq, x=x):
                with torch.inference_mode(), autocast_ctx(env, precision):
                    return vq.decode(x)

            env.reset_peak()
            if env.cuda or px < 1024:
                flops, _ = count_flops(fn)  # doubles as warm-up
                med, times, _ = env.timed(fn, warmup=0, repeats=10 if env.cuda else 2,
                                          budget_s=args.budget_s)
                note = ""
            else:  # one cold run, counted and timed at once (FlopCounterMode adds ~us per op)
                t0 = time.perf_counter()
                flops, _ = count_flops(fn)
                med, times, note = time.perf_counter() - t0, [0.0], "1 cold run"
            rows.append(dict(codec=codec, prior=name, batch=b, px=px, precision=precision,
                             ms=med * 1e3, runs=len(times), gflop=flops / 1e9,
                             gflops=flops / med / 1e9, mem_mib=env.peak_mib(), note=note))
            log(f"decode {codec} b{b} {px}^2: {med:.2f} s")
        del vq
        gc.collect()


# ------------------------------------------------------------------------------------------
# targets and tables
# ------------------------------------------------------------------------------------------


def _fmt(v, nd=1) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _mem(m: tuple[float, float]) -> str:
    return f"{m[0]:,.0f} (+{m[1]:,.0f})"


def table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]


def find(rows, **kv):
    return [r for r in rows if all(r.get(k) == v for k, v in kv.items())]


def e2e_rows(res: dict) -> list[dict]:
    """100-step sampling + decode per image, for the priors that have a codec."""
    out = []
    for d in res.get("decode", []):
        for s in find(res.get("sampler", []), preset=d["prior"], batch=d["batch"]):
            total = s["total_s"] + d["ms"] / 1e3
            out.append(dict(prior=d["prior"], px=d["px"], batch=d["batch"], variant=s["variant"],
                            early_stop=s["early_stop"], extrapolated=s["extrapolated"],
                            sample_s=s["total_s"], steps_run=s["steps_run"], steps=s["steps"],
                            decode_s=d["ms"] / 1e3, s_per_image=total / d["batch"],
                            images_per_s=d["batch"] / total))
    return out


def targets(env: Env, res: dict) -> list[str]:
    lines = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'MISS'}  {text}")

    hg = res.get("hourglass", [])
    for b in sorted({r["batch"] for r in hg}):
        f = find(hg, model="flat", batch=b)[0]
        for r in find(hg, batch=b):
            if r["model"] != "flat":
                speed, fl = f["ms"] / r["ms"], f["gflop"] / r["gflop"]
                text = (f"{r['model']} >= 2x faster per step than flat at 32x32 (b{b}): "
                        f"{r['ms']:.0f} vs {f['ms']:.0f} ms = {speed:.2f}x (FLOP ratio "
                        f"{fl:.2f}x)")
                if r["model"] == "hourglass":
                    line(speed >= 2, text)
                else:  # an ablation, not a shipped preset
                    lines.append(f"INFO  {text}")
    fw = [r for r in res.get("forward", []) if r["variant"] == "eager"]
    agree = res.get("agreement", [])
    for r in fw:
        if r["precision"] not in BF16:
            continue
        ref = find(fw, preset=r["preset"], batch=r["batch"], precision="fp32")
        ag = find(agree, preset=r["preset"], batch=r["batch"], precision=r["precision"],
                  kind="argmax")
        if not ref or not ag:
            continue
        speed = ref[0]["ms"] / r["ms"]
        smp = find(agree, preset=r["preset"], batch=r["batch"], precision=r["precision"],
                   kind="sampled T=1, shared noise")
        line(speed >= 2 and ag[0]["pct"] >= 99,
             f"{r['precision']} >= 2x faster than fp32, >= 99% argmax agreement "
             f"({r['preset']} b{r['batch']}): {speed:.2f}x, {ag[0]['pct']:.2f}%"
             + (f" (sampled tokens: {smp[0]['pct']:.2f}%)" if smp else ""))
    peaks = res["peaks"]["best"]
    for key, precs in (("fp32", ("fp32",)), ("bf16", BF16)):
        cand = [r for r in fw if r["preset"] == "ffhq1024" and r["precision"] in precs]
        if cand:
            best = max(cand, key=lambda r: r["gflops"])
            line(best["pct_peak"] >= 40,
                 f"ffhq1024 forward >= 40% of measured {key} matmul peak: {best['gflops']:.1f} "
                 f"of {peaks[key]:.1f} GFLOP/s = {best['pct_peak']:.0f}% "
                 f"(b{best['batch']} {best['precision']})")
    sam = res.get("sampler", [])
    for s in sam:  # early stop off, or on where no off run exists (random weights never freeze)
        if s["variant"] != "eager" or (s["early_stop"] and find(
                sam, preset=s["preset"], batch=s["batch"], variant="eager", early_stop=False)):
            continue
        line(s["overhead_pct"] <= 5,
             f"sampler overhead <= 5% of a step ({s['preset']} b{s['batch']}): "
             f"{s['overhead_pct']:.1f}% ({s['step_s'] * 1e3:.1f} ms step, "
             f"{s['fwd_s'] * 1e3:.1f} ms forward{', extrapolated' if s['extrapolated'] else ''})")
    if env.cuda:
        for e in e2e_rows(res):
            if e["px"] == 1024 and e["batch"] == 1:
                line(e["s_per_image"] <= 0.3,
                     f"<= 0.3 s per 1024^2 image at batch 1 ({e['variant']}, early stop "
                     f"{'on' if e['early_stop'] else 'off'}): {e['s_per_image']:.3f} s")
    ch = res.get("sampler_checks", {})
    if "cfg" in ch:
        c = ch["cfg"]
        line(c["forwards"] == c["steps"] and set(c["batches"]) == {4},
             f"CFG: both branches in one forward: {c['forwards']} forwards for {c['steps']} "
             f"steps, batch sizes {sorted(set(c['batches']))} for batch 2")
    if "toy" in ch:
        off, on = ch["toy"][False], ch["toy"][True]
        rows_on, rows_off = sum(on["batches"]), off["batch"] * off["steps"]
        line(on["total_s"] < off["total_s"] and rows_on < rows_off,
             f"early stop on the peaked toy: {off['total_s']:.2f} -> {on['total_s']:.2f} s "
             f"({100 * (1 - on['total_s'] / off['total_s']):.0f}% saved), sample-forwards "
             f"{rows_off} -> {rows_on}, last step {on['steps_run']}"
             + (" (off: extrapolated)" if off["extrapolated"] else ""))
    runs = res.get("sampler", []) + list(ch.get("toy", {}).values())
    if runs:
        line(all(r["inference"] for r in runs), "every sampler forward ran in inference mode")
    if "syncs" in ch:
        sy = ch["syncs"]
        pre = sy["per_step"][: sy["min_steps"]]
        extra = {k: v for k, v in sy["where"].items() if "sampler.py" not in k}
        line(max(pre, default=0) == 0 and not extra,
             f"host syncs: none before min_steps, after it only the sampler's early-stop check "
             f"(+ the frozen-sample index at a freeze): per step {sy['per_step']}; "
             + ("others: " + ", ".join(f"{k} x{v}" for k, v in extra.items()) if extra else
                "no others"))
        if env.cuda:
            line(not [w for w in sy["cuda_where"] if "sampler.py" not in w],
                 f"CUDA sync debug mode: {sy['cuda_warnings']} syncs in {len(sy['per_step'])} "
                 f"steps at {', '.join(sy['cuda_where']) or 'none'}")
    return lines


def _runs(batches: list[int]) -> str:
    """Run-length batch sizes per forward: [8, 8, 8, 5] -> '8x3, 5'."""
    out: list[list[int]] = []
    for b in batches:
        if out and out[-1][0] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return ", ".join(f"{b}x{n}" if n > 1 else str(b) for b, n in out)


def render(env: Env, args, res: dict) -> list[str]:
    """The report as markdown (printed, and written to RESULTS.md)."""
    m = res["meta"]
    md = [heading(env, args), "",
          f"`{m['command']}` — {m['date']}, {m['machine']}, torch {m['torch']}, "
          f"{m['threads']} threads, load average {m['load_start']} at start / {m['load_end']} "
          f"at end (1/5/15 min), {m['elapsed_min']:.1f} min. Random weights; times are medians.",
          "", "Peak memory: " + ("`torch.cuda.max_memory_allocated`, (+ the part above what "
                                 "stayed allocated)." if env.cuda else
                                 "peak RSS of the process during the measurement (VmHWM reset "
                                 "before it, after malloc_trim), (+ the part above the RSS at "
                                 "its start, i.e. activations and workspace; the weights are "
                                 "in the first number)."), ""]
    if "peaks" in res:
        p = res["peaks"]
        md += ["Measured matmul peak (square GEMMs, random data, fastest of the repeats; the "
               "best per dtype is the peak used below):", ""]
        md += table(["dtype", "call", "measured", "m x k x n", "ms", "GFLOP/s"],
                    [list(r) for r in p["rows"]])
        if not env.cuda:
            f = res["cpu"]
            ratio = p["best"]["fp32"] / max(p["best"]["bf16"], 1e-9)
            md += ["", f"Why bf16 is slow here: {f['cpu']}, torch CPU capability "
                   f"`{f['capability']}`, oneDNN bf16 supported: {f['onednn_bf16']}, flags: "
                   + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in f["flags"].items())
                   + f". Without AVX-512-BF16 / AMX, bf16 GEMMs are emulated (convert + fp32 "
                   f"FMA, or aten's reference loop for `mm`): the best bf16 path is {ratio:.1f}x "
                   "slower than fp32, so fp32 is the fast path on this CPU."]
        if "threads" in res:
            md += ["", "Threads (`small` b1 fp32 forward, interleaved): "
                   + ", ".join(f"{t} thread{'s' if t > 1 else ''} {ms:.1f} ms"
                               for t, ms in res["threads"].items())
                   + ". With other processes competing for the 2 cores, OpenMP regions wait "
                   "for a descheduled thread; the load average is given above."]
        md.append("")
    fw = res.get("forward", [])
    if fw:
        md += ["Prior forward (one denoising step, `validate=False` as the sampler calls it; "
               "runs = 1: a single cold forward, when one costs more than the per-item "
               "budget):", ""]
        md += table(["preset", "params M", "batch", "precision", "variant", "ms/step", "GFLOP",
                     "GFLOP/s", "% of peak", "peak mem MiB (+extra)", "runs", "SDPA kernels"],
                    [[r["preset"], res["params"][r["preset"]] / 1e6, r["batch"], r["precision"],
                      r["variant"] + (f" (1st call {r['first_call_s']:.1f} s)"
                                      if r["variant"] == "compiled" and r["first_call_s"] else ""),
                      r["ms"], r["gflop"], r["gflops"], r["pct_peak"], _mem(r["mem_mib"]), r["runs"],
                      r["kernels"] or "–"] for r in fw])
        md.append("")
    if res.get("agreement"):
        md += ["bf16 vs fp32 on the same tokens (% of positions with the same token). Random "
               "weights give nearly flat logits: where the fp32 top-1/top-2 gap is below the "
               "bf16 logit error the argmax flips; sampling at T = 1 with shared noise is what "
               "the sampler does:", ""]
        md += table(["preset", "batch", "precision", "compared", "agreement %",
                     "fp32 median top1-top2 gap", "median abs(bf16 - fp32) logit"],
                    [[a["preset"], a["batch"], a["precision"], a["kind"], f"{a['pct']:.2f}",
                      f"{a['gap']:.4f}" if a["gap"] is not None else "–",
                      f"{a['dlogit']:.4f}" if a["dlogit"] is not None else "–"]
                     for a in res["agreement"]])
        md.append("")
    if res.get("hourglass"):
        md += ["Hourglass vs flat transformer, same width and total depth, 32x32 grid, "
               "interleaved runs:", ""]
        md += table(["model", "depth", "batch", "precision", "ms/step", "GFLOP", "params M",
                     "runs"], [[r["model"], r["depth"], r["batch"], r["precision"], r["ms"],
                                r["gflop"], r["params_m"], r["runs"]] for r in res["hourglass"]])
        md.append("")
    if res.get("sampler"):
        md += [f"Sampling, {args.steps} steps, T 1.0->0.7, p 1.0 (`sample` defaults). Random "
               "weights: a sample freezes only when a whole step changes no token, which random "
               "logits never allow, so early stop on ~= off here (see the peaked toy below). "
               "'extrapolated' = first step + (steps-1) x median of steps 2..k:", ""]
        md += table(["preset", "batch", "variant", "early stop", "steps run", "total s",
                     "ms/step", "forward ms", "overhead %", "forward batch sizes",
                     "peak mem MiB (+extra)"],
                    [[s["preset"], s["batch"], s["variant"], "on" if s["early_stop"] else "off",
                      f"{s['steps_run']}" + (" (extrapolated)" if s["extrapolated"] else ""),
                      s["total_s"], s["step_s"] * 1e3, s["fwd_s"] * 1e3, s["overhead_pct"],
                      _runs(s["batches"]), _mem(s["mem_mib"])] for s in res["sampler"]])
        md.append("")
    ch = res.get("sampler_checks", {})
    if "toy" in ch:
        md += ["Early stop on a converged toy (`small` network, logits = 0.01 x network + 20 x "
               "one-hot(fixed target), p = 0.3, min_steps 10):", ""]
        md += table(["early stop", "steps run", "total s", "forward batch sizes"],
                    [["on" if es else "off", t["steps_run"] if not t["extrapolated"] else
                      f"{t['steps']} (extrapolated from {t['steps_run']})", t["total_s"],
                      _runs(t["batches"])] for es, t in ch["toy"].items()])
        md.append("")
    if "syncs" in ch:
        sy, cfg = ch["syncs"], ch.get("cfg", {})
        md += [f"Host reads per sampler step, counted by a dispatch mode (aten item / bool / "
               f"nonzero / boolean indexing; each one blocks on a GPU), on the peaked toy "
               f"(batch 2, min_steps {sy['min_steps']}, forward batch sizes "
               f"{_runs(sy['batches'])}): {sy['per_step']}; where: "
               + (", ".join(f"`{k}` x{v}" for k, v in sy["where"].items()) or "none")
               + (f". CUDA sync debug mode: {sy['cuda_warnings']} syncs at "
                  f"{', '.join(sy['cuda_where']) or 'none'}" if env.cuda else "")
               + (". With CFG (class-conditional `small`, 4 steps): "
                  + ", ".join(f"`{k}` x{v}" for k, v in cfg["syncs"].items()) if cfg else "")
               + ".", ""]
    if "token_check" in ch:
        tc = ch["token_check"]
        md += [f"Cost of one host sync per step ({tc['preset']} b1, {args.steps} steps): "
               f"{tc['sampler default'] * 1e3:.2f} ms/step as sampled (range checks skipped in "
               f"the loop), {tc['validate=True forced'] * 1e3:.2f} ms/step with the prior's "
               f"range check (a host read) forced on every forward.", ""]
    if res.get("decode"):
        md += ["VQ-GAN decode (random weights):", ""]
        md += table(["codec", "batch", "pixels", "precision", "s", "GFLOP", "GFLOP/s",
                     "peak mem MiB (+extra)", "runs"],
                    [[d["codec"], d["batch"], f"{d['px']}^2", d["precision"], d["ms"] / 1e3,
                      d["gflop"], d["gflops"], _mem(d["mem_mib"]),
                      d["note"] or d["runs"]] for d in res["decode"]])
        md.append("")
    e2e = e2e_rows(res)
    if e2e:
        md += ["End to end (sampling + decode):", ""]
        md += table(["prior", "pixels", "batch", "variant", "early stop", "sampling s",
                     "decode s", "s / image", "images / s"],
                    [[e["prior"], f"{e['px']}^2", e["batch"], e["variant"],
                      "on" if e["early_stop"] else "off",
                      f"{e['sample_s']:.2f}" + (" (extrap.)" if e["extrapolated"] else ""),
                      e["decode_s"], f"{e['s_per_image']:.3f}", f"{e['images_per_s']:.3f}"]
                     for e in e2e])
        md.append("")
    md += ["Targets:", "", "```", *res["targets"], "```", ""]
    if res["skipped"]:
        md += ["Skipped:", ""] + [f"- {s}" for s in res["skipped"]] + [""]
    return md


GPU_PENDING = ["### CUDA run", "",
               "Not run yet: no GPU was lent to this task. `bash benchmarks/gpu.sh` (H200 "
               "reference) runs `run.py --device cuda` with bf16 weights, SDPA flash attention "
               "and torch.compile, batch 1 and 16, and writes this subsection.", ""]
INTRO = ["`python benchmarks/run.py --write-results` measures everything below in one process "
         "(see its docstring); `benchmarks/gpu.sh` is the prepared CUDA run. Each device has its "
         "own subsection, replaced by the next run on that device.", ""]


def heading(env: Env, args) -> str:
    return f"### {'CUDA' if env.cuda else 'CPU'} run" + (f" ({args.tag})" if args.tag else "")


def write_results(md: list[str], path: Path = RESULTS) -> None:
    """Replace this run's subsection (its ``###`` heading) of our section of RESULTS.md, keep
    the others. Re-reads the file right before writing: other benchmarks own other sections."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == SECTION), None)
    if start is None:
        before, old, after = lines, [], []
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        before, old, after = lines[:start], lines[start + 1:end], lines[end:]
    subs: dict[str, list[str]] = {}
    key = None
    for ln in old:
        if ln.startswith("### "):
            key = ln.strip()
            subs[key] = []
        if key:
            subs[key].append(ln)
    subs[md[0]] = md
    if not any(k.startswith("### CUDA") for k in subs):
        subs[GPU_PENDING[0]] = GPU_PENDING
    order = sorted(subs, key=lambda k: (not k.startswith("### CPU"), k))
    body = [SECTION, "", *INTRO]
    for k in order:
        body += [ln for ln in subs[k]]
        while body[-1] == "":
            body.pop()
        body.append("")
    new = before + ([""] if before and before[-1] != "" else []) + body + after
    path.write_text("\n".join(new).rstrip("\n") + "\n")
    log(f"wrote {path}: {md[0]}")


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
