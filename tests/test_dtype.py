"""``preferred_dtype`` — what ``auto`` precision means — with the CPU capability and the GPU mocked
both ways (nothing here depends on this machine's CPU or GPU), and its users: the trainer's
``resolve_precision``, the loader nodes' ``pick_dtype``, ``sundae-train sample / inpaint
--precision`` and ``sundae-train env``."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from click.testing import CliRunner
from comfyui_sundae import sundae_lib
from comfyui_sundae.nodes import comfy_adapter
from comfyui_sundae.sundae_lib import dtypes
from comfyui_sundae.trainer import runtime, sample_cmd
from comfyui_sundae.trainer.cli import main

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


class Bench:
    """Stands in for the micro-benchmark: returns ``ratio`` and counts its calls."""

    def __init__(self, ratio: float) -> None:
        self.ratio, self.calls = ratio, 0

    def __call__(self, *args, **kwargs) -> float:
        self.calls += 1
        return self.ratio


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(flags, ratio)`` fakes the CPU: the bf16 flags it advertises and the measured
    bf16 speed-up; the per-process cache and the conftest's SUNDAE_CPU_DTYPE are cleared."""
    monkeypatch.delenv(dtypes.ENV_CPU_DTYPE, raising=False)
    dtypes._measured_cpu_choice.cache_clear()

    def fake(flags: tuple[str, ...], ratio: float) -> Bench:
        bench = Bench(ratio)
        monkeypatch.setattr(dtypes, "cpu_bf16_flags", lambda *a, **k: tuple(flags))
        monkeypatch.setattr(dtypes, "measure_cpu_bf16_speedup", bench)
        return bench

    yield fake
    dtypes._measured_cpu_choice.cache_clear()


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(native_bf16)`` fakes a CUDA device with or without native bf16 (emulation yes)."""

    def fake(native_bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported",
            lambda including_emulation=True: native_bf16 or including_emulation,
        )

    return fake


# ----------------------------------------------------------------------------------------------
# the choice
# ----------------------------------------------------------------------------------------------


def test_public_name():
    assert sundae_lib.preferred_dtype is dtypes.preferred_dtype
    assert "preferred_dtype" in sundae_lib.__all__


def test_cpu_with_bf16_isa_measured_faster_is_bf16(cpu):
    bench = cpu(("amx_bf16", "avx512_bf16"), 3.0)
    assert dtypes.preferred_dtype(CPU) == torch.bfloat16
    assert dtypes.preferred_dtype("cpu") == torch.bfloat16
    rep = dtypes.cpu_bf16_report()
    assert rep["dtype"] == "bf16" and rep["ratio"] == 3.0 and rep["source"] == "measured"
    assert rep["flags"] == ("amx_bf16", "avx512_bf16")
    assert bench.calls == 1  # measured once per process, however often asked


@pytest.mark.parametrize("ratio", [0.2, 1.1])  # slower, and faster but under MIN_SPEEDUP
def test_cpu_with_bf16_isa_measured_not_faster_is_fp32(cpu, ratio):
    bench = cpu(("avx512_bf16",), ratio)
    assert dtypes.preferred_dtype(CPU) == torch.float32
    assert dtypes.cpu_bf16_report()["ratio"] == ratio
    assert bench.calls == 1


def test_cpu_without_bf16_isa_is_fp32_without_measuring(cpu):
    bench = cpu((), 10.0)
    assert dtypes.preferred_dtype(CPU) == torch.float32
    rep = dtypes.cpu_bf16_report()
    assert rep["ratio"] is None and rep["flags"] == () and "no AMX" in rep["reason"]
    assert bench.calls == 0


def test_cpu_measurement_failure_is_fp32(cpu, monkeypatch):
    cpu(("amx_bf16",), 3.0)

    def broken(*a, **k):
        raise RuntimeError("no bf16 kernel")

    monkeypatch.setattr(dtypes, "measure_cpu_bf16_speedup", broken)
    assert dtypes.preferred_dtype(CPU) == torch.float32


def test_env_override_skips_the_measurement(cpu, monkeypatch):
    bench = cpu((), 10.0)
    monkeypatch.setenv("SUNDAE_CPU_DTYPE", "bf16")
    assert dtypes.preferred_dtype(CPU) == torch.bfloat16
    assert dtypes.cpu_bf16_report()["source"] == "env"
    bench = cpu(("amx_bf16",), 10.0)
    monkeypatch.setenv("SUNDAE_CPU_DTYPE", "FP32")
    assert dtypes.preferred_dtype(CPU) == torch.float32
    assert bench.calls == 0
    monkeypatch.setenv("SUNDAE_CPU_DTYPE", "fp16")
    with pytest.raises(ValueError, match=r"SUNDAE_CPU_DTYPE='fp16' is not one of fp32, bf16"):
        dtypes.preferred_dtype(CPU)


def test_cuda_bf16_where_native_else_fp16(gpu, cpu):
    bench = cpu(("amx_bf16",), 10.0)
    gpu(native_bf16=True)
    assert dtypes.preferred_dtype(CUDA) == torch.bfloat16
    assert dtypes.preferred_dtype() == torch.bfloat16  # None = CUDA when there is one
    gpu(native_bf16=False)  # emulated bf16 (pre-Ampere) is slow: fp16
    assert dtypes.preferred_dtype(CUDA) == torch.float16
    assert bench.calls == 0  # a GPU choice never times the CPU


def test_other_devices_are_fp32():
    assert dtypes.preferred_dtype("mps") == torch.float32


def test_cpu_flags_from_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert dtypes.cpu_bf16_flags(info) == ("amx_bf16", "avx512_bf16")
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert dtypes.cpu_bf16_flags(info) == ()
    # no cpuinfo (macOS, Windows): torch's probes, and nothing when they find nothing
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert dtypes.cpu_bf16_flags(tmp_path / "absent") == ("avx512_bf16",)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert dtypes.cpu_bf16_flags(tmp_path / "absent") == ()


def test_measurement_returns_a_speed_ratio():
    ratio = dtypes.measure_cpu_bf16_speedup(size=16, reps=1)  # tiny: exercises the code, not the CPU
    assert ratio > 0 and math.isfinite(ratio)


# ----------------------------------------------------------------------------------------------
# its users
# ----------------------------------------------------------------------------------------------


def test_trainer_auto_precision_follows_preferred_dtype(cpu, gpu):
    cpu(("amx_bf16",), 3.0)
    assert runtime.resolve_precision("auto", CPU) == (torch.bfloat16, False)  # autocast on AMX
    cpu(("amx_bf16",), 0.5)
    dtypes._measured_cpu_choice.cache_clear()
    assert runtime.resolve_precision("auto", CPU) == (None, False)  # fp32: no autocast
    gpu(native_bf16=True)
    assert runtime.resolve_precision("auto", CUDA) == (torch.bfloat16, False)
    gpu(native_bf16=False)
    assert runtime.resolve_precision("auto", CUDA) == (torch.float16, True)  # + GradScaler
    assert runtime.resolve_precision("auto", torch.device("mps")) == (None, False)


def test_trainer_warns_on_explicit_bf16_only_without_fast_cpu_bf16(cpu, caplog):
    cpu((), 1.0)
    with caplog.at_level(logging.WARNING, logger="comfyui_sundae.trainer.runtime"):
        assert runtime.resolve_precision("bf16", CPU) == (torch.bfloat16, False)
    assert "slower than fp32" in caplog.text
    caplog.clear()
    cpu(("amx_bf16",), 4.0)
    dtypes._measured_cpu_choice.cache_clear()
    with caplog.at_level(logging.WARNING, logger="comfyui_sundae.trainer.runtime"):
        assert runtime.resolve_precision("bf16", CPU) == (torch.bfloat16, False)
    assert "slower than fp32" not in caplog.text


def test_node_auto_dtype_follows_preferred_dtype(cpu, gpu, monkeypatch):
    cpu(("amx_bf16",), 3.0)
    assert comfy_adapter.pick_dtype("auto", CPU) == torch.bfloat16
    cpu((), 3.0)
    dtypes._measured_cpu_choice.cache_clear()
    assert comfy_adapter.pick_dtype("auto", CPU) == torch.float32
    assert comfy_adapter.pick_dtype("bf16", CPU) == torch.bfloat16  # as asked (with a warning)
    gpu(native_bf16=False)
    assert comfy_adapter.pick_dtype("auto", CUDA) == torch.float16

    class FakeModelManagement:  # ComfyUI run with --force-fp32: no half dtype on the GPU
        @staticmethod
        def should_use_bf16(device):
            return False

        should_use_fp16 = should_use_bf16

    monkeypatch.setattr(comfy_adapter, "_model_management", lambda: FakeModelManagement)
    assert comfy_adapter.pick_dtype("auto", CUDA) == torch.float32
    gpu(native_bf16=True)
    FakeModelManagement.should_use_bf16 = staticmethod(lambda device: True)
    assert comfy_adapter.pick_dtype("auto", CUDA) == torch.bfloat16


@pytest.mark.parametrize("command", ["sample", "inpaint"])
def test_cli_precision_option(command, monkeypatch, tmp_path):
    seen = {}
    target = "run_sample" if command == "sample" else "run_inpaint"
    monkeypatch.setattr(sample_cmd, target, lambda **kw: seen.update(kw) or [tmp_path / "x.png"])
    extra = [] if command == "sample" else ["--image", __file__, "--box", "0,0,1,1"]
    res = CliRunner().invoke(main, [command, *extra, "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    assert seen["precision"] == "bf16"
    res = CliRunner().invoke(main, [command, *extra])
    assert res.exit_code == 0 and seen["precision"] == "auto"
    res = CliRunner().invoke(main, [command, *extra, "--precision", "fp8"])
    assert res.exit_code == 2 and "'fp8' is not one of" in res.output


def test_cli_prior_runs_in_the_chosen_dtype(cpu):
    """auto on a (faked) fast-bf16 CPU puts the prior in bf16 and keeps the codec fp32; an
    explicit fp32 wins; and a bf16 prior really samples."""
    cpu(("amx_bf16",), 3.0)
    prior, codec, _ = sample_cmd._setup("mnist-vq", None, "cpu", "auto")
    assert next(prior.parameters()).dtype == torch.bfloat16
    assert next(codec.parameters()).dtype == torch.float32
    tokens = sundae_lib.sample(prior, batch_size=1, steps=2, labels=torch.tensor([3]),
                               generator=torch.Generator().manual_seed(0))
    assert tokens.dtype == torch.int64 and 0 <= int(tokens.min()) and int(tokens.max()) < prior.codebook_size
    prior, _, _ = sample_cmd._setup("mnist-vq", None, "cpu", "fp32")
    assert next(prior.parameters()).dtype == torch.float32


def test_env_prints_flags_ratio_and_choice(cpu):
    cpu(("amx_bf16", "avx512_bf16"), 2.5)
    res = CliRunner().invoke(main, ["env"])
    assert res.exit_code == 0, res.output
    assert "amx_bf16 avx512_bf16" in res.output
    assert "2.50x fp32" in res.output
    assert "cpu auto dtype bf16" in res.output
    cpu((), 2.5)
    dtypes._measured_cpu_choice.cache_clear()
    res = CliRunner().invoke(main, ["env"])
    assert "none (no AMX / AVX512-BF16)" in res.output and "not measured" in res.output
    assert "cpu auto dtype fp32" in res.output


def test_trainer_ranks_follow_rank_0s_cpu_choice(cpu, monkeypatch):
    """Under DDP on CPU only rank 0 measures; the others take its choice (no timing, no warning)."""
    bench = cpu(("amx_bf16",), 0.5)  # this rank alone would pick fp32
    monkeypatch.setattr(runtime.dist, "running", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    sent = []
    monkeypatch.setattr(runtime.dist, "broadcast_object", lambda obj: sent.append(obj) or "bf16")
    assert runtime.resolve_precision("auto", CPU) == (torch.bfloat16, False)
    assert sent == [None] and bench.calls == 0
