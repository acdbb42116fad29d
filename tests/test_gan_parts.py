"""The GAN side of VQ-GAN training: adversarial losses and the adaptive weight, the PatchGAN
discriminator (taming's key layout) and LPIPS. Expected values are hand-computed or come from a
second, independent implementation written here."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from comfyui_sundae.sundae_lib.discriminator import (
    NLayerDiscriminator,
    adopt_weight,
    build_discriminator,
    calculate_adaptive_weight,
    generator_adversarial_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from comfyui_sundae.sundae_lib.lpips import LPIPS, make_perceptual_loss
from comfyui_sundae.sundae_lib.vq_losses import VQGANLoss, VQLossConfig
from safetensors.torch import save_file

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# GAN losses
# ---------------------------------------------------------------------------------------------


def test_gan_losses_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = (0, 0.5, 2); relu(1 + fake) = (0, 1, 2.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))

    def sp(v):
        return math.log1p(math.exp(v))

    expected = 0.5 * (sum(sp(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(sp(f) for f in (-2.0, 0.0, 1.5)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert generator_adversarial_loss(fake).item() == pytest.approx(0.5 / 3)
    assert adopt_weight(1.0, 99, threshold=100) == 0.0
    assert adopt_weight(1.0, 100, threshold=100) == 1.0
    assert adopt_weight(0.7, 5, threshold=10, value=0.1) == 0.1


def test_adaptive_weight_hand_computed():
    last = torch.nn.Parameter(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    a = torch.tensor([[1.0, 0.0], [2.0, -1.0], [0.5, 0.5], [0.0, 3.0]])
    b = torch.tensor([[0.1, 0.2], [0.0, -0.3], [0.4, 0.0], [0.2, 0.1]])
    out = x @ last.T
    nll, g = (out * a).sum(), (out * b).sum()
    # d/dW Σ a ⊙ (x Wᵀ) = aᵀ x
    expected = torch.linalg.norm(a.T @ x) / (torch.linalg.norm(b.T @ x) + 1e-4) * 0.5
    w = calculate_adaptive_weight(nll, g, last, 0.5)
    assert w.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not w.requires_grad
    # a generator loss without gradient at the last layer clamps at 1e4
    w_big = calculate_adaptive_weight(nll, (out * 0.0).sum(), last, 1.0)
    assert w_big.item() == pytest.approx(1e4)


# ---------------------------------------------------------------------------------------------
# discriminator
# ---------------------------------------------------------------------------------------------


def test_discriminator_taming_key_layout_and_init():
    disc = build_discriminator(3, 64, 3)
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    expected = {
        "main.0.weight": (64, 3, 4, 4),
        "main.0.bias": (64,),
        "main.2.weight": (128, 64, 4, 4),
        "main.5.weight": (256, 128, 4, 4),
        "main.8.weight": (512, 256, 4, 4),
        "main.11.weight": (1, 512, 4, 4),
        "main.11.bias": (1,),
    }
    for i, c in ((3, 128), (6, 256), (9, 512)):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            expected[f"main.{i}.{leaf}"] = (c,)
        expected[f"main.{i}.num_batches_tracked"] = ()
    assert shapes == expected
    w = disc.main[8].weight
    assert abs(w.mean().item()) < 2e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)
    bn = disc.main[9]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=5e-3)
    assert bn.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.all(bn.bias == 0)


def test_discriminator_output_shapes_rgb_and_gray():
    assert build_discriminator(3, 8, 3)(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    gray = NLayerDiscriminator(input_nc=1, ndf=8, n_layers=3)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 1, 2, 2)
    assert gray(torch.randn(1, 1, 28, 28)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="input_nc=3"):
        gray(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="too small"):
        gray(torch.randn(1, 1, 16, 16))


def test_discriminator_actnorm_variant():
    disc = build_discriminator(3, 8, 2, use_actnorm=True).train()
    keys = set(disc.state_dict())
    assert {"main.2.bias", "main.3.loc", "main.3.scale", "main.3.initialized"} <= keys
    assert not any("running_mean" in k for k in keys)
    x = torch.randn(4, 3, 32, 32)
    feats = disc.main[:4](x)  # conv, lrelu, conv, actnorm: initialised on this batch
    assert feats.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(feats.std(dim=(0, 2, 3)), torch.ones(16), atol=1e-3)
    assert disc.main[3].initialized.item() == 1


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(1)
    model = LPIPS()
    for k in range(5):  # non-uniform, non-negative heads like the learned ones
        torch.nn.init.uniform_(getattr(model, f"lin{k}").model[1].weight, 0.0, 1.0)
    return model


def _reference_lpips(sd, x0, x1):
    """Second implementation straight from a taming-layout state dict (functional ops only)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    convs = sorted(
        (int(k.split(".")[2]), k.rsplit(".", 1)[0]) for k in sd if k.startswith("net.") and k.endswith("weight")
    )
    pools = {4, 9, 16, 23}
    taps = {3, 8, 15, 22, 29}  # relu1_2 … relu5_3 in torchvision numbering
    out = 0.0
    hs = [(x - shift) / scale for x in (x0, x1)]
    feats = [[], []]
    for idx, name in convs:
        for side in range(2):
            h = hs[side]
            if idx - 1 in pools:
                h = F.max_pool2d(h, 2)
            h = F.relu(F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1))
            hs[side] = h
            if idx + 1 in taps:
                feats[side].append(h)
    for k, (f0, f1) in enumerate(zip(*feats, strict=True)):
        n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = sd[f"lin{k}.model.1.weight"]
        out = out + ((n0 - n1) ** 2 * w.reshape(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return out


def test_lpips_matches_independent_implementation(lpips_model):
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    x1 = (x0 + 0.3 * torch.randn_like(x0)).clamp(-1, 1)
    ours = lpips_model(x0, x1)
    ref = _reference_lpips(lpips_model.state_dict(), x0, x1)
    assert ours.shape == (2,)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_lpips_zero_for_identical_and_grows_with_noise(lpips_model):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x)
    assert torch.all(lpips_model(x, x).abs() < 1e-6)
    values = [lpips_model(x, x + s * noise).mean().item() for s in (0.05, 0.2, 0.6)]
    assert 0 < values[0] < values[1] < values[2]


def test_lpips_frozen_but_input_gradient_flows_and_gray(lpips_model):
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    lpips_model(x, torch.zeros(1, 3, 16, 16)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips_model.parameters())
    lpips_model.train()
    assert not lpips_model.training
    g0, g1 = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    gray = lpips_model(g0, g1)
    rgb = lpips_model(g0.repeat(1, 3, 1, 1), g1.repeat(1, 3, 1, 1))
    assert torch.allclose(gray, rgb)
    loss = VQGANLoss(VQLossConfig(disc_ndf=8, disc_num_layers=2), perceptual=lpips_model).train()
    assert loss.discriminator.training and not lpips_model.training


def test_lpips_from_file_round_trips(lpips_model, tmp_path):
    sd = lpips_model.state_dict()
    x0, x1 = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    want = lpips_model(x0, x1)
    # a taming training checkpoint: prefixed LPIPS keys among the model's other keys
    ckpt = {f"loss.perceptual_loss.{k}": v for k, v in sd.items()}
    ckpt["encoder.conv_in.weight"] = torch.zeros(2, 3, 3, 3)
    ckpt["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    torch.save({"state_dict": ckpt, "global_step": 7}, tmp_path / "last.ckpt")
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(tmp_path / "prefixed.safetensors"))
    torch.save(dict(sd), tmp_path / "plain.pth")
    for name in ("last.ckpt", "prefixed.safetensors", "plain.pth"):
        assert torch.allclose(LPIPS.from_file(tmp_path / name)(x0, x1), want), name
    # linear heads alone (taming's vgg.pth) + a torchvision VGG16 state dict
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    torch.save(lin, tmp_path / "vgg.pth")
    tv = {}
    for k, v in sd.items():
        if k.startswith("net."):
            _, _, idx, leaf = k.split(".")
            tv[f"features.{idx}.{leaf}"] = v
    tv["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(tv, tmp_path / "vgg16.pth")
    loaded = LPIPS.from_file(tmp_path / "vgg.pth", vgg=tmp_path / "vgg16.pth")
    assert torch.allclose(loaded(x0, x1), want)
    with pytest.raises(ValueError, match="vgg="):
        LPIPS.from_file(tmp_path / "vgg.pth")
    bad = dict(sd)
    bad.pop("lin3.model.1.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lin3.model.1.weight"):
        LPIPS.from_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        LPIPS.from_file(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="hf://owner/repo"):
        LPIPS.from_file("hf://owner-only")
    with pytest.raises(ValueError, match="not a file"):
        LPIPS.from_file("hf://owner/repo")


def test_make_perceptual_loss_warns_once_when_absent(lpips_model, tmp_path, caplog):
    log = logging.getLogger("test-trainer")
    with caplog.at_level(logging.WARNING, logger="test-trainer"):
        assert make_perceptual_loss(None, log) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "perceptual" in warnings[0].getMessage()
    torch.save(dict(lpips_model.state_dict()), tmp_path / "lpips.pth")
    caplog.clear()
    model = make_perceptual_loss(str(tmp_path / "lpips.pth"), log)
    assert isinstance(model, LPIPS) and not any(r.levelno >= logging.WARNING for r in caplog.records)
