"""One home per rule: ``sundae_lib.checks`` (scalars, token grids), ``_helpers.unwrap`` and the
prior's unchecked forward, and that every entry point uses them."""

from __future__ import annotations

import math

import pytest
import torch
from comfyui_sundae.nodes.codec_nodes import SundaeDecode
from comfyui_sundae.nodes.types import CodecHandle, TokenBatch
from comfyui_sundae.sundae_lib import (
    VQGAN,
    PixelCodec,
    SundaePrior,
    VQGANConfig,
    sample,
    save_prior,
    save_vqgan,
    sundae_loss,
)
from comfyui_sundae.sundae_lib._helpers import load_safetensors, module_device, unwrap
from comfyui_sundae.sundae_lib.checks import (
    check_bool,
    check_int,
    check_number,
    check_tokens,
    is_int,
    is_number,
)
from comfyui_sundae.sundae_lib.prior import forward_unchecked
from conftest import tiny_prior
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch.compile's first use imports dynamo, which trips torch's own deprecation warning
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


# --------------------------------------------------------------------------------------------
# scalars
# --------------------------------------------------------------------------------------------


def test_is_int_and_is_number_exclude_bool():
    assert [is_int(v) for v in (3, -1, True, False, 3.0, "3", None)] == [
        True, True, False, False, False, False, False]
    assert [is_number(v) for v in (3, 2.5, math.inf, True, "1", None)] == [
        True, True, True, False, False, False]


def test_check_int_bounds_and_messages():
    assert check_int(5, "x", minimum=5, maximum=5) == 5
    with pytest.raises(ValueError, match=r"^cfg.n must be an integer >= 1, got 0$"):
        check_int(0, "cfg.n", minimum=1)
    with pytest.raises(ValueError, match=r"^cfg.n must be an integer >= 1, got True; use 4$"):
        check_int(True, "cfg.n", minimum=1, hint="use 4")
    with pytest.raises(ValueError, match=r"must be an integer in \[2, 8\], got 9$"):
        check_int(9, "levels", minimum=2, maximum=8)
    with pytest.raises(ValueError, match=r"must be an integer <= 8, got 2.0$"):
        check_int(2.0, "n", maximum=8)
    with pytest.raises(ValueError, match=r"^n must be an integer, got '3'$"):
        check_int("3", "n")


def test_check_number_bounds_and_messages():
    assert check_number(1, "p", low=0, high=1) == 1.0 and isinstance(check_number(1, "p"), float)
    with pytest.raises(ValueError, match=r"^p must lie in \(0, 1\], got 0$"):
        check_number(0, "p", low=0, high=1, low_open=True)
    with pytest.raises(ValueError, match=r"^p must lie in \[0, 1\), got 1.0; a probability$"):
        check_number(1.0, "p", low=0, high=1, high_open=True, hint="a probability")
    with pytest.raises(ValueError, match=r"^base must be a number > 1, got 1$"):
        check_number(1, "base", low=1, low_open=True)
    with pytest.raises(ValueError, match=r"^s must be a number <= 2, got 3$"):
        check_number(3, "s", high=2)
    for bad in (math.nan, math.inf, True, "0.5", None):
        with pytest.raises(ValueError, match=r"^w must be a finite number"):
            check_number(bad, "w")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got nan"):
        check_number(math.nan, "q", low=0, high=1)


def test_check_bool():
    assert check_bool(False, "flag") is False
    with pytest.raises(ValueError, match=r"^flag must be true or false, got 1$"):
        check_bool(1, "flag")


# --------------------------------------------------------------------------------------------
# token grids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, match",
    [
        ([[[0]]], r"^W: tokens must be a torch.Tensor \[b, h, w\] of int64 codebook indices, got list$"),
        (torch.zeros(1, 2, 2), r"^W: tokens must be integer codebook indices \(int64 \[b, h, w\]\), "
                               r"got dtype torch.float32; if these are images"),
        (torch.zeros(1, 2, 2, dtype=torch.bool), r"got dtype torch.bool"),
        (torch.zeros(2, 2, dtype=torch.long), r"^W: tokens must have shape \[b, h, w\], got \(2, 2\) "
                                              r"\(add a batch axis: tokens\[None\]\)$"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.long), r"got \(1, 1, 2, 2\)$"),
        (torch.zeros(1, 0, 2, dtype=torch.long), r"^W: tokens shape \(1, 0, 2\) is empty"),
        (torch.tensor([[[0, 8]]]), r"^W: token ids span \[0, 8\] but the model has 8 codes: tokens "
                                   r"must lie in \[0, 8\); use the other one$"),
        (torch.tensor([[[-3, 2]]]), r"span \[-3, 2\]"),
    ],
)
def test_check_tokens_messages(tokens, match):
    with pytest.raises(ValueError, match=match):
        check_tokens(tokens, 8, "W", owner="the model", hint="use the other one")


def test_check_tokens_returns_int64_without_copying_int64():
    t = torch.tensor([[[0, 7]]])
    assert check_tokens(t, 8, "W") is t
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.uint16):
        got = check_tokens(t.to(dtype), 8, "W")
        assert got.dtype == torch.int64 and torch.equal(got, t)


def _decode_node(tokens):
    codec = CodecHandle(PixelCodec(16), "pixels", torch.device("cpu"), torch.float32)
    return SundaeDecode().decode(codec, TokenBatch(tokens, None, 1), 0)


@pytest.mark.parametrize(
    "entry, who",
    [
        (lambda t: tiny_prior()(t), "SundaePrior: token ids span [0, 16] but this prior has 16"),
        (lambda t: sundae_loss(tiny_prior(), t), "sundae_loss: token ids span [0, 16] but the prior"),
        (lambda t: sample(tiny_prior(), init_tokens=t, steps=1),
         "sample: token ids span [0, 16] but the prior has 16 codes: init_tokens must lie in [0, 16)"),
        (lambda t: PixelCodec(16).decode(t), "PixelCodec.decode: token ids span [0, 16] but this codec"),
        (lambda t: VQGAN(VQGANConfig.preset("tiny", n_embed=16)).decode(t),
         "VQGAN.decode: token ids span [0, 16] but this codec has 16"),
        (_decode_node, "SundaeDecode: token ids span [0, 16] but the VQ-GAN 'pixels' has 16 codes"),
    ],
)
def test_every_entry_point_uses_the_one_token_validator(entry, who):
    tokens = torch.zeros(1, 4, 4, dtype=torch.long)
    tokens[0, 1, 2] = 16
    with pytest.raises(ValueError) as err:
        entry(tokens)
    assert str(err.value).startswith(who)
    assert "must lie in [0, 16)" in str(err.value)


# --------------------------------------------------------------------------------------------
# unwrap
# --------------------------------------------------------------------------------------------


def _fake_ddp(module: nn.Module) -> nn.parallel.DistributedDataParallel:
    """A DistributedDataParallel instance without a process group (only its type and
    ``.module`` matter to ``unwrap``)."""
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = module
    return ddp


class _Holder(nn.Module):  # has a .module but is no training wrapper (like an EMA holder)
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_unwrap_peels_training_wrappers_in_any_nesting():
    prior = tiny_prior()
    compiled = torch.compile(prior)  # not run: only the wrapper object
    for wrapped in (prior, nn.DataParallel(prior), _fake_ddp(prior), compiled,
                    _fake_ddp(compiled), torch.compile(nn.DataParallel(_fake_ddp(prior)))):
        assert unwrap(wrapped) is prior
    holder = _Holder(prior)
    assert unwrap(holder) is holder, "only DDP / DataParallel / torch.compile are unwrapped"
    assert module_device(nn.DataParallel(prior)) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")


def test_save_functions_unwrap_and_refuse_other_containers(tmp_path):
    prior = tiny_prior()
    save_prior(torch.compile(_fake_ddp(prior)), tmp_path / "p.safetensors")
    assert set(load_safetensors(tmp_path / "p.safetensors")) == set(prior.state_dict())
    vq = VQGAN(VQGANConfig.preset("tiny"))
    save_vqgan(nn.DataParallel(vq), tmp_path / "v.safetensors")
    assert set(load_safetensors(tmp_path / "v.safetensors")) == set(vq.state_dict())
    with pytest.raises(ValueError, match="save_vqgan expects a VQGAN, got _Holder"):
        save_vqgan(_Holder(vq), tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="save_prior expects a SundaePrior, got _Holder"):
        save_prior(_Holder(prior), tmp_path / "h.safetensors")


# --------------------------------------------------------------------------------------------
# validate once, then no per-call checks
# --------------------------------------------------------------------------------------------


@pytest.fixture
def count_checks(monkeypatch):
    """Counts the prior's per-call input checks (each costs a host synchronisation)."""
    calls = {"check_tokens": 0, "resolve_labels": 0}
    for name in calls:
        real = getattr(SundaePrior, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(SundaePrior, name, spy)
    return calls


def test_sundae_loss_unroll_runs_no_per_step_checks(count_checks):
    prior = tiny_prior(num_classes=3).train()
    tokens = torch.randint(0, 16, (2, 8, 8))
    sundae_loss(prior, tokens, [0, 2], unroll_steps=3, generator=torch.Generator().manual_seed(0))
    assert count_checks == {"check_tokens": 0, "resolve_labels": 0}
    prior(tokens, torch.tensor([0, 1]))  # control: a plain forward checks both
    assert count_checks == {"check_tokens": 1, "resolve_labels": 1}


def test_sampler_steps_run_no_per_step_checks(count_checks):
    sample(tiny_prior(num_classes=3), batch_size=2, labels=1, steps=3, cfg_scale=2.0,
           generator=torch.Generator().manual_seed(0))
    assert count_checks == {"check_tokens": 0, "resolve_labels": 0}


class _HostReads(TorchDispatchMode):
    """Counts aten ops that copy a tensor value to the host (``item`` / ``bool`` / ``tolist``,
    ``nonzero``, ...): on a GPU each one waits for the queue to drain."""

    SYNCING = {"is_nonzero", "item", "_local_scalar_dense", "tolist", "nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.SYNCING
        return func(*args, **(kwargs or {}))


def test_sundae_loss_host_reads_do_not_grow_with_the_unroll():
    prior = tiny_prior(num_classes=3).train()
    tokens = torch.randint(0, 16, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    reads = {}
    for steps in (1, 2, 4):
        with _HostReads() as counter:
            sundae_loss(prior, tokens, [0, 2], unroll_steps=steps, region_corruption=0.5,
                        generator=torch.Generator().manual_seed(0))
        reads[steps] = counter.count
    assert reads[1] == reads[2] == reads[4], reads  # the checks at the top only
    assert 0 < reads[1] <= 4, reads  # tokens' range and the labels' range


def test_forward_unchecked_matches_the_checked_forward_through_wrappers():
    prior = tiny_prior(num_classes=3)
    tokens = torch.randint(0, 16, (3, 5, 6))
    labels = torch.tensor([0, -1, 2])
    with torch.no_grad():
        want = prior(tokens, labels)
        for wrapped in (prior, nn.DataParallel(prior)):
            assert torch.equal(forward_unchecked(wrapped, tokens, labels), want)
        assert torch.equal(forward_unchecked(prior, tokens, None), prior(tokens, None))

    class Double(nn.Module):  # a test double without the validate keyword gets a plain call
        def forward(self, tokens, labels):
            return tokens.float()

    assert torch.equal(forward_unchecked(Double(), tokens, labels), tokens.float())
