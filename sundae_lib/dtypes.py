"""Which dtype runs fastest on a device: ``preferred_dtype`` — what ``auto`` means everywhere
(ComfyUI loader nodes, ``sundae-train sample`` / ``inpaint --precision``, ``run.precision``).

- CUDA: bf16 where the GPU has native bf16 (Ampere and newer), else fp16 (the trainer pairs it
  with a GradScaler).
- CPU: bf16 only when the CPU advertises AMX or AVX512-BF16 *and* a one-time micro-benchmark in
  this process finds bf16 matmuls at least ``MIN_SPEEDUP`` times faster than fp32; else fp32.
  Without those instructions bf16 matmuls are emulated and 4-8x *slower* than fp32, and a flag
  alone is not proof (a VM may advertise AMX the kernel never enables, oneDNN may not use it).
  The result is cached per process; ``cpu_bf16_report()`` shows the evidence.
- Anything else (mps, xpu, ...): fp32.

``SUNDAE_CPU_DTYPE=fp32|bf16`` overrides the CPU choice without measuring (reproducible runs,
or a CPU whose flags we cannot read).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV_CPU_DTYPE = "SUNDAE_CPU_DTYPE"
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this factor: a tie is not worth bf16's rounding
BENCH_SIZE = 512  # square matmul side: ~0.27 GFLOP, a few ms per product in fp32 on one core
BENCH_REPS = 3  # timed repetitions (best of), after one warm-up each
_ENV_VALUES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (and fp32 / fp16); other dtypes as torch spells them."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


# --------------------------------------------------------------------------------------------
# CPU: capability flags and the one-time measurement
# --------------------------------------------------------------------------------------------


def cpu_bf16_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 matmul instructions this CPU advertises (a subset of ``CPU_BF16_FLAGS``).

    Linux: the ``flags`` line of ``/proc/cpuinfo``. Elsewhere (or if it is unreadable): torch's
    own cpuinfo probes when this torch build has them; nothing found -> ``()`` -> fp32."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            flags = set(line.partition(":")[2].split())
            return tuple(f for f in CPU_BF16_FLAGS if f in flags)
    found = []
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for flag, probe in probes.items():
        fn = getattr(getattr(torch, "cpu", None), probe, None)
        try:
            if fn is not None and fn():
                found.append(flag)
        except Exception:  # private torch probes: absent or failing means "unknown" = no
            pass
    return tuple(found)


def _best_time(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    torch.mm(a, b)  # warm-up: oneDNN picks / JITs its kernel on the first call
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_bf16_speedup(size: int = BENCH_SIZE, reps: int = BENCH_REPS) -> float:
    """fp32 time / bf16 time of a ``size x size`` matmul on the CPU (best of ``reps`` after a
    warm-up), with torch's current thread count: > 1 means bf16 is faster. ~0.1 s in all."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    with torch.inference_mode():
        t32 = _best_time(a, b, reps)
        t16 = _best_time(a.bfloat16(), b.bfloat16(), reps)
    return t32 / max(t16, 1e-9)


@functools.lru_cache(maxsize=1)
def _measured_cpu_choice() -> dict[str, Any]:
    """Flags and (only when a flag is present) the measurement; once per process."""
    flags = cpu_bf16_flags()
    if not flags:
        return {"flags": flags, "ratio": None, "dtype": "fp32",
                "reason": "no AMX / AVX512-BF16: bf16 would be emulated, fp32 is faster"}
    try:
        ratio = measure_cpu_bf16_speedup()
    except Exception as exc:  # a bf16 kernel missing in this build: stay exact
        logger.warning("bf16 micro-benchmark failed (%s); using fp32 on CPU", exc)
        return {"flags": flags, "ratio": None, "dtype": "fp32", "reason": f"bf16 matmul failed: {exc}"}
    fast = ratio >= MIN_SPEEDUP
    reason = (f"bf16 matmul {ratio:.2f}x the speed of fp32 "
              f"({'>=' if fast else '<'} {MIN_SPEEDUP}x needed)")
    logger.info("CPU %s: %s -> %s", "/".join(flags), reason, "bf16" if fast else "fp32")
    return {"flags": flags, "ratio": ratio, "dtype": "bf16" if fast else "fp32", "reason": reason}


def cpu_bf16_report() -> dict[str, Any]:
    """How the CPU dtype was chosen: ``{"dtype": "bf16" | "fp32", "flags": tuple of found
    CPU_BF16_FLAGS, "ratio": fp32 time / bf16 time or None (not measured), "source": "env" |
    "measured", "reason": str, "torch_capability": str}``. Measures on the first call only
    (and not at all under ``SUNDAE_CPU_DTYPE`` or without flags)."""
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    forced = _env_cpu_dtype()
    if forced is not None:
        return {"dtype": dtype_name(forced), "flags": cpu_bf16_flags(), "ratio": None, "source": "env",
                "reason": f"{ENV_CPU_DTYPE}={os.environ[ENV_CPU_DTYPE].strip()}", "torch_capability": capability}
    return {**_measured_cpu_choice(), "source": "measured", "torch_capability": capability}


def _env_cpu_dtype() -> torch.dtype | None:
    forced = os.environ.get(ENV_CPU_DTYPE, "").strip().lower()
    if not forced:
        return None
    if forced not in _ENV_VALUES:
        raise ValueError(f"{ENV_CPU_DTYPE}={forced!r} is not one of fp32, bf16; unset it to let the CPU be measured")
    return _ENV_VALUES[forced]


# --------------------------------------------------------------------------------------------
# the public choice
# --------------------------------------------------------------------------------------------


def cuda_has_bf16(device: torch.device | str | None = None) -> bool:
    """Native bf16 on this CUDA device (emulated bf16 on older GPUs is slow: it does not count)."""
    device = torch.device(device if device is not None else "cuda")
    try:
        if device.index is not None:
            with torch.cuda.device(device):
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation (and did not count emulation)
        return bool(torch.cuda.is_bf16_supported())


def preferred_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The fastest safe dtype for ``device`` (default: CUDA if available, else CPU).

    CUDA: ``torch.bfloat16`` with native bf16, else ``torch.float16``. CPU: ``torch.bfloat16``
    when the CPU has AMX / AVX512-BF16 and a one-time measurement confirms bf16 matmuls are
    faster (or ``SUNDAE_CPU_DTYPE=bf16``), else ``torch.float32``. Other devices: fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
    if device.type == "cpu":
        forced = _env_cpu_dtype()
        return forced if forced is not None else _ENV_VALUES[_measured_cpu_choice()["dtype"]]
    return torch.float32


def cpu_has_fast_bf16() -> bool:
    """True when ``preferred_dtype("cpu")`` is bf16 (for warnings about an explicit bf16)."""
    return preferred_dtype("cpu") == torch.bfloat16

