"""What machine a benchmark ran on, printed beside its numbers (standard library only: the
official code's worker in ``vs_official.py`` imports this from its own venv)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# the flags that decide which precision is fast on a CPU (dtypes.preferred_dtype's inputs)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_description() -> str:
    """``"<model> [<speed flags it has>], <n> logical CPUs"``."""
    have = (_cpuinfo_field("flags") or "").split()
    flags = " ".join(f for f in SPEED_FLAGS if f in have)
    return f"{cpu_model()} [{flags or 'flags unknown'}], {os.cpu_count()} logical CPUs"
