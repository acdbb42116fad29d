"""Opt-in ``torch.compile`` of a prior for inference: ``compile_prior(prior)``.

What it buys (measured by ``benchmarks/vs_official.py --compile``, numbers in
``benchmarks/RESULTS.md``): inductor fuses the layer norms, GELU, rotary and residual adds into
few kernels and, with *freezing*, treats the weights as constants so the CPU matmuls run on
prepacked oneDNN weights (and the rotary tables the prior keeps for its trained grid,
``layers.FixedRotary``, as constants the kernels load instead of evaluating cos and sin for
every element of q and k); on CPUs the graph calls its kernels from generated C++
(inductor's ``cpp_wrapper``), not Python. On small priors, where a forward is many small kernels, that is the
larger share; on big ones the matmuls dominate and the gain is smaller. What it costs: a compile
of tens of seconds on a 2-core CPU per new input shape (the first call; with early stop the
batch shrinks, which compiles once more with a dynamic batch), and a C++ compiler on CPUs.

So it is never the default: use it for long sampling sessions with one model. The compiled
prior is a drop-in for ``sample()``: attributes (``config``, ``codebook_size``) come from the
wrapped prior and the results equal the eager prior's tokens (the same seed, to the last bit
on the CPUs we tested: ``tests/test_compiled.py``). Frozen weights are a snapshot: do not train
or edit the prior after compiling it.

If compiling fails at the first call (no working C++ toolchain, an unsupported platform), the
prior logs one warning naming the cause and runs eagerly from then on: a sampling session is
never lost to a compiler problem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from ._helpers import module_device, unwrap

logger = logging.getLogger(__name__)

__all__ = ["CompiledPrior", "compile_prior", "cpu_compiler"]


def cpu_compiler() -> str | None:
    """Path of the C++ compiler inductor would use on a CPU (``$CXX``, else ``c++`` / ``g++`` /
    ``clang++`` on the PATH), or None when there is none."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else []
    candidates += ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "compiling failed" (not "the model raised")."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

        errors += [BackendCompilerFailed, TorchDynamoException]
    except ImportError:  # pragma: no cover - very old torch
        pass
    try:
        from torch._inductor.exc import InductorError  # type: ignore[attr-defined]

        errors.append(InductorError)
    except ImportError:  # pragma: no cover - torch without it
        pass
    return tuple(errors)


def _inductor_options(freezing: bool, cpp_wrapper: bool) -> contextlib.AbstractContextManager:
    """Inductor settings, set through the config around every call of the compiled prior (they
    take effect in the calls that compile: the first one and any recompile), so other compiles
    in the process (e.g. ComfyUI's) keep their own.

    - ``freezing``: weights become constants. Not ``torch.compile(options={"freezing": True})``:
      with the option alone, torch 2.13 folds the weights but its CPU matmuls stay
      ``aten::addmm`` instead of prepacked oneDNN ``_linear_pointwise`` (measured in one process,
      bf16, 2-core AMX Xeon: ffhq256 batch 4 0.138 vs 0.115 s, small batch 4 0.027 vs 0.021 s;
      eager 0.159 / 0.033).
    - ``cpp_wrapper`` on CPUs: the compiled graph calls its kernels from generated C++ instead of
      Python, which saves the per-kernel call overhead of a forward made of many small kernels
      (small preset forward, batch 4, bf16, same machine, alternating in one process: 20.7 vs
      22.2 ms fastest, 27.4 vs 30.1 ms p25; 20-step sampling 1.03× at p25, within what an A/A run
      of the same code shows there; ~10 s more compile time; benchmarks/RESULTS.md). If
      compiling with it fails, ``CompiledPrior`` compiles once more without it."""
    import torch._inductor.config as inductor_config

    options = {}
    if freezing:
        options["freezing"] = True
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    return inductor_config.patch(**options) if options else contextlib.nullcontext()


class CompiledPrior(nn.Module):
    """A prior behind ``torch.compile`` that falls back to eager when compiling fails.

    ``_orig_mod`` is the prior itself (the name ``torch.compile`` uses), so
    ``_helpers.unwrap`` and therefore ``sample()`` read its attributes from the prior (other
    attributes are looked up on the prior too); forwards go through the compiled graph. Inside a
    compiled forward the per-block cancel checks are skipped: a cancel acts between steps. ``compiled`` is False once a compile failure made it eager.
    """

    def __init__(self, prior: nn.Module, compiled: Any, *, freezing: bool = True) -> None:
        super().__init__()
        self._orig_mod = prior
        # the compiled callable wraps the same prior: keep it out of the module tree, or the
        # weights would appear twice in state_dict() / parameters()
        object.__setattr__(self, "_compiled", compiled)
        self.freezing = bool(freezing)
        # inductor's C++ wrapper on CPUs; switched off if compiling with it fails
        self.cpp_wrapper = module_device(prior).type == "cpu"
        self.fallback_reason: str | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, codebook_size, metadata, ...: the prior's
            return getattr(self._modules["_orig_mod"], name)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._compiled is not None:
            try:
                with _inductor_options(self.freezing, self.cpp_wrapper):
                    return self._compiled(*args, **kwargs)
            except _compile_errors() as exc:
                cause = getattr(exc, "inner_exception", None) or exc  # the backend's own error
                lines = str(cause).strip().splitlines()
                self.fallback_reason = f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"
                if self.cpp_wrapper:  # the C++ wrapper is the newer, rarer path: try without it
                    logger.warning("compile_prior: compiling with inductor's C++ wrapper failed "
                                   "(%s); compiling again without it", self.fallback_reason)
                    self.cpp_wrapper = False
                    return self.forward(*args, **kwargs)
                logger.warning("compile_prior: compiling the prior failed (%s); running it "
                               "eagerly (same results, no speed-up). On a CPU torch.compile "
                               "needs a working C++ compiler.", self.fallback_reason)
                object.__setattr__(self, "_compiled", None)
        return self._orig_mod(*args, **kwargs)


def compile_prior(prior: nn.Module, *, freezing: bool = True) -> CompiledPrior:
    """``torch.compile`` a loaded prior for inference (see the module docstring for what it buys
    and costs). ``freezing``: treat the weights as constants (inductor's freezing: prepacked
    CPU matmuls); the prior must not be trained or edited afterwards. Put the prior on its
    device and in its dtype *before* compiling. Returns a module to pass to ``sample()`` in
    place of the prior.

    Raises ``ValueError`` for something that is not a SUNDAE prior, and on a CPU without a C++
    compiler (inductor could not build its kernels: install one, e.g. ``apt install g++``, or
    sample without compiling)."""
    from .prior import SundaePrior

    base = unwrap(prior)
    if isinstance(prior, CompiledPrior):
        return prior
    if not isinstance(base, SundaePrior):
        raise ValueError(f"compile_prior needs a SundaePrior (e.g. from load_prior), got "
                         f"{type(prior).__name__}")
    if not hasattr(torch, "compile"):
        raise ValueError(f"compile_prior: torch {torch.__version__} has no torch.compile; "
                         "use torch >= 2.1 or sample without compiling")
    if module_device(base).type == "cpu" and cpu_compiler() is None:
        raise ValueError("compile_prior: torch.compile on a CPU needs a C++ compiler and none "
                         "was found ($CXX, c++, g++, clang++); install one (e.g. apt install "
                         "g++) or sample without compiling")
    return CompiledPrior(base, torch.compile(base), freezing=freezing)
