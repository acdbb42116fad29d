"""compile_prior: the compiled prior samples the same tokens as the eager one, falls back to eager
(with a warning) when compiling fails, and refuses what it cannot compile."""

from __future__ import annotations

import logging

import pytest
import torch
from comfyui_sundae.sundae_lib import PriorConfig, SundaePrior, compile_prior, sample
from comfyui_sundae.sundae_lib import compiled as compiled_mod
from comfyui_sundae.sundae_lib._helpers import unwrap

pytestmark = pytest.mark.usefixtures("one_thread")


def _prior() -> SundaePrior:
    torch.manual_seed(0)
    return SundaePrior(PriorConfig.preset("tiny")).eval()


def _draw(prior) -> torch.Tensor:
    return sample(prior, batch_size=2, steps=3, temperature=1.0, update_proportion=1.0,
                  early_stop=False, min_steps=0, cfg_scale=1.0,
                  generator=torch.Generator().manual_seed(5))


@pytest.mark.skipif(compiled_mod.cpu_compiler() is None, reason="no C++ compiler on this machine")
def test_compiled_prior_samples_the_eager_tokens():
    prior = _prior()
    want = _draw(prior)
    fast = compile_prior(prior)
    assert unwrap(fast) is prior and fast.config is prior.config
    # the weights once, under the prefix torch.compile uses (unwrap() strips it for saving)
    assert list(fast.state_dict()) == [f"_orig_mod.{k}" for k in prior.state_dict()]
    got = _draw(fast)
    assert fast.compiled, fast.fallback_reason
    assert torch.equal(got, want)


def _compile_failure(message: str) -> Exception:
    """What torch.compile raises when the backend fails (the backend named in it: inductor)."""
    from torch._dynamo.exc import BackendCompilerFailed

    def inductor():
        pass

    return BackendCompilerFailed(inductor, RuntimeError(message), None)


def _compile_with(monkeypatch, caplog, fake_run):
    """compile_prior through a stand-in torch.compile whose compiled call is
    ``fake_run(model, *args)``; checks it samples the eager tokens, returns the compiled prior."""
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: lambda *args, **k: fake_run(model, *args, **k))
    monkeypatch.setattr(compiled_mod, "cpu_compiler", lambda: "/usr/bin/c++")
    prior = _prior()
    want = _draw(prior)
    fast = compile_prior(prior)
    with caplog.at_level(logging.WARNING, logger=compiled_mod.__name__):
        got = _draw(fast)
    assert torch.equal(got, want)
    return fast


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    calls = []

    def broken(model, *args, **kw):
        calls.append(1)
        raise _compile_failure("no C++ toolchain")

    fast = _compile_with(monkeypatch, caplog, broken)
    assert not fast.compiled and fast.fallback_reason == "RuntimeError: no C++ toolchain"
    assert len(calls) == 2  # tried with the C++ wrapper, once more without, then eager
    assert "compiling again without it" in caplog.text and "running it eagerly" in caplog.text


def test_a_cpp_wrapper_failure_compiles_again_without_it(monkeypatch, caplog):
    """Only the C++ wrapper fails: the prior stays compiled (freezing kept), one warning."""
    import torch._inductor.config as inductor_config

    seen = []

    def picky(model, *args, **kw):
        seen.append((inductor_config.cpp_wrapper, inductor_config.freezing))
        if inductor_config.cpp_wrapper:
            raise _compile_failure("cpp_wrapper: no")
        return model(*args, **kw)

    fast = _compile_with(monkeypatch, caplog, picky)
    assert fast.compiled and not fast.cpp_wrapper
    assert seen[:2] == [(True, True), (False, True)] and set(seen[2:]) == {(False, True)}
    assert "compiling again without it" in caplog.text and "eagerly" not in caplog.text


@pytest.mark.skipif(compiled_mod.cpu_compiler() is None, reason="no C++ compiler on this machine")
def test_compiled_prior_with_early_stop_recompiles_for_the_smaller_batch():
    """Early stop drops converged samples from the batch: the compiled prior (C++ wrapper on)
    compiles again for the smaller batch and still gives the eager tokens."""
    prior = _prior()
    with torch.no_grad():  # logits that favour token 0: samples converge at different steps
        prior.to_logits.weight.mul_(0.1)
        prior.to_logits.bias.zero_()
        prior.to_logits.bias[0] = 7.0
    batches = []
    prior.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))

    def draw(model):
        return sample(model, batch_size=3, steps=40, temperature=1.0, update_proportion=1.0,
                      early_stop=True, min_steps=1, cfg_scale=1.0,
                      generator=torch.Generator().manual_seed(5))

    want = draw(prior)
    assert len(set(batches)) > 1, batches  # the batch did shrink
    fast = compile_prior(prior)
    got = draw(fast)
    assert fast.compiled and fast.cpp_wrapper, fast.fallback_reason
    assert torch.equal(got, want)


def test_model_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(compiled_mod, "cpu_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    fast = compile_prior(_prior())
    with pytest.raises(ValueError, match="tokens"):
        fast(torch.zeros(1, 8, 8))  # floats: the prior's own check, not a compile failure
    assert fast.compiled


def test_compile_prior_refuses_what_it_cannot_compile(monkeypatch):
    with pytest.raises(ValueError, match="needs a SundaePrior"):
        compile_prior(torch.nn.Linear(2, 2))
    monkeypatch.setattr(compiled_mod, "cpu_compiler", lambda: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        compile_prior(_prior())


@pytest.mark.skipif(compiled_mod.cpu_compiler() is None, reason="no C++ compiler on this machine")
def test_cli_compile_flag_writes_the_same_images(tmp_path, caplog):
    """The tiny prior of the test above behind a 16-level pixel codec: the same graph, so
    inductor's cache makes this compile cheap."""
    from click.testing import CliRunner
    from comfyui_sundae.sundae_lib import save_prior
    from comfyui_sundae.trainer.cli import main

    model = tmp_path / "tiny.safetensors"
    save_prior(_prior(), model, metadata={"sundae.codec": "pixel:levels=16,channels=1"})
    outs = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"s{len(flag)}.png"
        args = ["sample", "--model", str(model), "-n", "2", "--steps", "3", "--no-early-stop",
                "-t", "1.0", "-p", "1.0", "--cfg", "1", "--precision", "fp32", "--out", str(out),
                *flag]
        with caplog.at_level(logging.INFO):
            result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outs[bool(flag)] = out.read_bytes()
    assert outs[True] == outs[False]
    assert "prior compiled with torch.compile" in caplog.text  # the flag reached the prior
    assert "compiling the prior failed" not in caplog.text  # and it ran compiled, no fallback


@pytest.mark.parametrize("num_classes", [0, 3])
def test_prior_forward_is_one_graph(num_classes):
    """No graph break in the sampler's forward (``validate=False``): a break splits the compiled
    prior into pieces and slows every step (an ``operator.attrgetter`` property once did)."""
    torch.manual_seed(0)
    prior = SundaePrior(PriorConfig.preset("tiny", num_classes=num_classes)).eval()
    whole = torch.compile(prior, backend="eager", fullgraph=True)  # raises on any break
    tokens = torch.randint(0, prior.codebook_size, (2, 8, 8))
    labels = torch.tensor([1, -1]) if num_classes else None
    with torch.inference_mode():
        got = whole(tokens, labels, validate=False)
        want = prior(tokens, labels, validate=False)
    assert torch.equal(got, want)


def test_inductor_options_are_restored_after_the_call():
    """freezing (prepacked CPU matmuls) and, on CPUs, the C++ wrapper are set around the
    compiled call and restored afterwards, so other compiles in the process keep theirs."""
    import torch._inductor.config as inductor_config

    before = (inductor_config.freezing, inductor_config.cpp_wrapper)
    with compiled_mod._inductor_options(True, True):
        assert inductor_config.freezing and inductor_config.cpp_wrapper
    with compiled_mod._inductor_options(True, False):  # a GPU prior: no C++ wrapper
        assert inductor_config.freezing and inductor_config.cpp_wrapper == before[1]
    with compiled_mod._inductor_options(False, False):
        assert (inductor_config.freezing, inductor_config.cpp_wrapper) == before
    assert (inductor_config.freezing, inductor_config.cpp_wrapper) == before

def test_the_cpp_wrapper_is_used_on_cpus_only(monkeypatch):
    monkeypatch.setattr(compiled_mod, "cpu_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    assert compile_prior(_prior()).cpp_wrapper is True
    assert compiled_mod.CompiledPrior(_prior().to("meta"), None).cpp_wrapper is False
