"""PatchGAN discriminator for VQ-GAN training (taming-transformers' key layout) and the GAN
losses: hinge / vanilla critic losses, generator loss, adaptive weight, start-step gating.

``NLayerDiscriminator`` is the pix2pix PatchGAN that taming's ``VQLPIPSWithDiscriminator`` uses:
its ``state_dict`` keys are ``main.0.weight``, ``main.0.bias``, ``main.2.weight``,
``main.3.{weight,bias,running_mean,running_var,num_batches_tracked}``, … exactly as
``loss.discriminator.main.*`` in a taming training checkpoint (strip the ``loss.discriminator.``
prefix to load one). Build it with :func:`build_discriminator` (or call :func:`weights_init`
yourself) to get taming's initialisation.

The discriminator is a module of its own, trained by its own optimizer; it is never a submodule of
the VQ-GAN (that would need ``find_unused_parameters=True`` under DDP and mix the two optimizers'
parameters).

Axis legend: b batch, c channels, H W image size, h w patch-logit grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import check_int

__all__ = [
    "ActNorm",
    "NLayerDiscriminator",
    "adopt_weight",
    "build_discriminator",
    "frozen",
    "calculate_adaptive_weight",
    "generator_adversarial_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
    "weights_init",
]


def weights_init(module: nn.Module) -> None:
    """taming's initialisation, applied with ``model.apply(weights_init)``: conv weights
    N(0, 0.02); BatchNorm weights N(1, 0.02) and biases 0. Conv biases keep PyTorch's default (as
    in taming, whose test is the class name)."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


class ActNorm(nn.Module):
    """Per-channel affine normalisation with data-dependent initialisation (Glow; taming's
    ``ActNorm`` with ``logdet=False``): ``y = scale · (x + loc)``. On the first forward pass in
    training mode ``loc``/``scale`` are set so that the batch has zero mean and unit standard
    deviation per channel (averaged over ranks when a process group is running, so DDP replicas
    stay identical). Keys: ``loc``, ``scale`` [1, c, 1, 1], ``initialized`` (uint8 buffer)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = rearrange(x.float(), "b c h w -> c (b h w)")
        mean = flat.mean(dim=1)
        std = flat.std(dim=1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.stack([mean, std])
            torch.distributed.all_reduce(stats)
            mean, std = stats / torch.distributed.get_world_size()
        self.loc.copy_(rearrange(-mean, "c -> 1 c 1 1"))
        self.scale.copy_(rearrange(1.0 / (std + 1e-6), "c -> 1 c 1 1"))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and int(self.initialized.item()) == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix, as in taming-transformers).

    Layers (``main``): conv 4×4 stride 2 (+bias) → LeakyReLU(0.2); then ``n_layers − 1`` times
    conv 4×4 stride 2 (no bias with BatchNorm) → norm → LeakyReLU; then conv 4×4 stride 1 → norm →
    LeakyReLU; then conv 4×4 stride 1 to one logit channel. Widths ``ndf · min(2^i, 8)``.

    Args:
        input_nc: image channels (3 for RGB, 1 for grayscale).
        ndf: width of the first conv layer.
        n_layers: number of stride-2 convs (3 gives a 70×70 receptive field).
        use_actnorm: ``ActNorm`` instead of ``BatchNorm2d`` (then every conv has a bias, as in
            taming).

    Forward: ``x [b, input_nc, H, W] -> logits [b, 1, h, w]`` (for ``n_layers = 3``:
    ``h = H/8 − 2``; e.g. 256 → 30, 64 → 6, 32 → 2).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        for name, value in (("input_nc", input_nc), ("ndf", ndf), ("n_layers", n_layers)):
            check_int(value, f"NLayerDiscriminator: {name}", minimum=1)
        self.input_nc = input_nc
        self.ndf = ndf
        self.n_layers = n_layers
        self.use_actnorm = bool(use_actnorm)

        def norm(channels: int) -> nn.Module:
            return ActNorm(channels) if use_actnorm else nn.BatchNorm2d(channels)

        use_bias = bool(use_actnorm)  # BatchNorm has its own shift, so the convs before it do not
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=use_bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=use_bias),
            norm(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)

    def logit_size(self, size: int) -> int:
        """Side of the logit grid for an image side ``size`` (conv arithmetic, k 4, pad 1)."""
        for _ in range(self.n_layers):
            size = (size + 2 - 4) // 2 + 1
        for _ in range(2):
            size = size + 2 - 4 + 1
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, input_nc, H, W] -> logits [b, 1, h, w]`` (one real/fake logit per patch)."""
        if x.ndim != 4 or x.shape[1] != self.input_nc:
            raise ValueError(
                f"NLayerDiscriminator: expected images [b, {self.input_nc}, H, W], got "
                f"{tuple(x.shape)} — build the discriminator with input_nc={x.shape[1] if x.ndim == 4 else '?'} "
                "(disc_in_channels) to match the images"
            )
        if min(self.logit_size(int(s)) for s in x.shape[-2:]) < 1:
            raise ValueError(
                f"NLayerDiscriminator: images of size {tuple(x.shape[-2:])} are too small for "
                f"n_layers={self.n_layers} (they leave no patch logits; need at least "
                f"{3 * 2**self.n_layers} pixels a side); use fewer layers (disc_num_layers)"
            )
        return self.main(x)


def build_discriminator(
    input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False
) -> NLayerDiscriminator:
    """An ``NLayerDiscriminator`` with taming's :func:`weights_init` applied."""
    disc = NLayerDiscriminator(input_nc=input_nc, ndf=ndf, n_layers=n_layers, use_actnorm=use_actnorm)
    disc.apply(weights_init)
    return disc


# --------------------------------------------------------------------------------------------
# GAN losses and weights (taming's VQLPIPSWithDiscriminator maths)
# --------------------------------------------------------------------------------------------


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps (the discriminator start), ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``½·(mean relu(1 − real) + mean relu(1 + fake))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``½·(mean softplus(−real) + mean softplus(fake))`` (the non-saturating BCE loss)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """taming's generator loss ``−mean(logits_fake)`` (for both hinge and vanilla critics)."""
    return -logits_fake.mean()


def calculate_adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    disc_weight: float = 1.0,
) -> torch.Tensor:
    """taming's adaptive GAN weight: ``‖∇_L nll‖ / (‖∇_L g‖ + 1e-4)`` at the decoder's last layer
    weight ``L``, clamped to [0, 1e4], detached, times ``disc_weight``. Balances the adversarial
    gradient against the reconstruction gradient. Keeps both graphs (``retain_graph``)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads.float()) / (torch.norm(g_grads.float()) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` with its parameters not requiring grad (restored afterwards): outputs still
    carry gradient to their *inputs*, but a later backward leaves the parameters' ``.grad``
    untouched. Used for the discriminator inside the generator step."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
