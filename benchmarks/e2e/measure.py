"""What every section of ``benchmarks/run.py`` measures with: the device (synchronisation, peak
memory, timing), FLOP counting, the SDPA kernels a call ran, precisions and the matmul peak."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from comfyui_sundae.sundae_lib import PriorConfig, SundaePrior
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

REPO = Path(__file__).resolve().parents[2]
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
