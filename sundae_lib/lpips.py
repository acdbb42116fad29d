"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, in taming-transformers' layout.

The network is implemented here (no torchvision): a VGG16 feature trunk cut after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3 (``net.slice1..5``, submodule indices as in torchvision's
``vgg16().features``), a fixed input ``scaling_layer`` (``shift``/``scale`` buffers) and five
non-negative 1×1 linear heads (``lin0..4.model.1.weight``, ``model.0`` being a parameter-free
dropout). The ``state_dict`` therefore matches ``loss.perceptual_loss.*`` in a taming training
checkpoint key for key.

Weights never download: :meth:`LPIPS.from_file` reads a file (or ``hf://owner/repo/file``) the
user names. Accepted layouts:

* a taming training checkpoint (Lightning ``.ckpt`` whose ``state_dict`` holds
  ``loss.perceptual_loss.*``) or any state dict with or without that prefix;
* the LPIPS linear heads alone (taming's / PerceptualSimilarity's ``vgg.pth``:
  ``lin0.model.1.weight`` …) together with ``vgg=`` a torchvision VGG16 state dict
  (``features.N.weight``; e.g. ``vgg16-397923af.pth``), which is mapped onto ``net.sliceK.N``.

``.safetensors`` files are read with safetensors, everything else with
``torch.load(weights_only=True)`` — never an unpickler that can run code.

Distance: both images are scaled, passed through the trunk; at each of the five cuts the features
are unit-normalised over channels, their squared difference is weighted per channel by the linear
head, averaged over space, and the five layer values are summed.

Axis legend: b batch, c channels, H W image size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from einops import repeat
from torch import nn

from ._helpers import (
    hf_download,
    is_hf_source,
    load_safetensors,
    load_state_dict_strict,
    parse_hf_source,
)

_logger = logging.getLogger(__name__)

__all__ = ["LPIPS", "make_perceptual_loss", "read_state_dict"]

TAMING_PREFIX = "loss.perceptual_loss."
# VGG16 `features` layout: conv widths per block; a max-pool opens every block after the first.
_VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CHANNELS = (64, 128, 256, 512, 512)


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet-normalised range VGG expects (LPIPS' constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """torchvision ``vgg16().features[:30]`` split into ``slice1..5`` at relu1_2 … relu5_3, keeping
    the original layer indices as submodule names (``slice2.5`` is ``features.5``)."""

    def __init__(self):
        super().__init__()
        index, in_ch = 0, 3
        for block, widths in enumerate(_VGG_BLOCKS, start=1):
            part = nn.Sequential()
            if block > 1:
                part.add_module(str(index), nn.MaxPool2d(kernel_size=2, stride=2))
                index += 1
            for width in widths:
                part.add_module(str(index), nn.Conv2d(in_ch, width, kernel_size=3, padding=1))
                part.add_module(str(index + 1), nn.ReLU(inplace=False))
                index, in_ch = index + 2, width
            self.add_module(f"slice{block}", part)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [b, 3, H, W]`` -> the five cut activations ``[b, c_k, H/2^k, W/2^k]``."""
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    """A 1×1 conv from ``chn_in`` channels to one, after a dropout (kept for the key layout
    ``model.1.weight``; inactive because LPIPS always runs in eval mode)."""

    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, kernel_size=1, bias=False))


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each spatial feature vector by its L2 norm over channels (LPIPS' eps)."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS (VGG16) distance. ``LPIPS()`` alone has random trunk weights and unit linear
    heads — useful for tests only; load real weights with :meth:`from_file`.

    The module is always in eval mode (``train()`` is a no-op) and its parameters never require
    grad, but gradients flow to the input images, so it can be used as a training loss.
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, chn in enumerate(CHANNELS):
            lin = NetLinLayer(chn)
            nn.init.ones_(lin.model[1].weight)
            self.add_module(f"lin{k}", lin)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """LPIPS is a fixed metric: stay in eval mode whatever the enclosing module does."""
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Perceptual distance per image.

        Args:
            input, target: ``[b, c, H, W]`` images in [-1, 1], ``c`` = 3 or 1 (grayscale is
                repeated to 3 channels); ``H, W`` >= 16.
        Returns:
            ``[b]`` float distances (0 for identical images).
        """
        if input.shape != target.shape:
            raise ValueError(
                f"LPIPS: input {tuple(input.shape)} and target {tuple(target.shape)} must have the "
                "same shape"
            )
        if input.ndim != 4 or input.shape[1] not in (1, 3):
            raise ValueError(
                f"LPIPS: expected images [b, 3 or 1, H, W], got {tuple(input.shape)}; convert other "
                "channel counts to RGB or grayscale first"
            )
        if min(input.shape[-2:]) < 16:
            raise ValueError(
                f"LPIPS: images of size {tuple(input.shape[-2:])} are too small for the VGG16 trunk "
                "(four 2× poolings; need at least 16×16); set perceptual_weight = 0 for tiny images"
            )
        if input.shape[1] == 1:
            input = repeat(input, "b 1 h w -> b c h w", c=3)
            target = repeat(target, "b 1 h w -> b c h w", c=3)
        batch = input.shape[0]
        # one pass through the trunk for both images (same result as two passes: no batch stats)
        feats = self.net(self.scaling_layer(torch.cat([input, target], dim=0)))
        total = input.new_zeros(batch, dtype=torch.float32)
        for k, f in enumerate(feats):
            f0, f1 = _unit_normalize(f[:batch].float()), _unit_normalize(f[batch:].float())
            lin = getattr(self, f"lin{k}").model[1]
            weighted = nn.functional.conv2d((f0 - f1) ** 2, lin.weight.float())
            total = total + weighted.mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_file(cls, source: str | os.PathLike, *, vgg: str | os.PathLike | None = None) -> LPIPS:
        """Load LPIPS weights from ``source`` (a path or ``hf://owner/repo/file``).

        ``source`` holds the full LPIPS state dict (with or without ``loss.perceptual_loss.``;
        other keys of a taming training checkpoint are ignored), or only the linear heads
        ``lin0..4.model.1.weight`` — then ``vgg`` must name a torchvision VGG16 state dict
        (``features.N.*``) or a file holding ``net.slice*`` keys. ``scaling_layer`` buffers are
        optional (LPIPS' fixed constants are used when absent). Anything else missing or
        unexpected is an error naming the keys.
        """
        sd = _lpips_keys(read_state_dict(source, what="LPIPS"), source)
        has_trunk = any(k.startswith("net.") for k in sd)
        if has_trunk and vgg is not None:
            raise ValueError(
                f"LPIPS: {str(source)!r} already contains the VGG16 trunk ('net.slice*'); drop vgg= "
                "(two sources for the same weights would be ambiguous)"
            )
        if not has_trunk:
            if vgg is None:
                raise ValueError(
                    f"LPIPS: {str(source)!r} holds only the LPIPS linear heads (no 'net.slice*' VGG16 "
                    "trunk); also pass vgg= a torchvision VGG16 state dict (e.g. "
                    "vgg16-397923af.pth) or use a taming training checkpoint"
                )
            trunk = _lpips_keys(read_state_dict(vgg, what="LPIPS VGG16 trunk"), vgg)
            sd = {**{k: v for k, v in trunk.items() if k.startswith("net.")}, **sd}
        model = cls()
        own = model.state_dict()
        for key in ("scaling_layer.shift", "scaling_layer.scale"):
            sd.setdefault(key, own[key])
        load_state_dict_strict(model, {k: v.float() for k, v in sd.items()}, what=f"LPIPS {str(source)!r}")
        model.requires_grad_(False)
        return model.eval()


def _lpips_keys(sd: Mapping[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """Normalise a state dict to LPIPS' own key names: strip ``loss.perceptual_loss.`` (keeping
    only those keys when present), strip a lone ``perceptual_loss.``, map torchvision
    ``features.N.*`` (VGG16) to ``net.sliceK.N.*`` and drop its ``classifier.*``."""
    keys = list(sd)
    for prefix in (TAMING_PREFIX, "perceptual_loss."):
        if any(k.startswith(prefix) for k in keys):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    out: dict[str, torch.Tensor] = {}
    bounds = _slice_bounds()
    for key, value in sd.items():
        if key.startswith("classifier."):
            continue  # torchvision VGG16's fully connected head: LPIPS does not use it
        if key.startswith("features."):
            _, idx, leaf = key.split(".", 2)
            if not idx.isdigit() or int(idx) >= bounds[-1]:
                continue  # layers past relu5_3 (the last max-pool has no weights anyway)
            block = next(b for b, end in enumerate(bounds, start=1) if int(idx) < end)
            key = f"net.slice{block}.{idx}.{leaf}"
        out[key] = value
    if not out:
        raise ValueError(f"LPIPS: {str(source)!r} contains no tensors")
    return out


def _slice_bounds() -> list[int]:
    """Exclusive end index of each slice in ``features`` numbering: [4, 9, 16, 23, 30]."""
    ends, index = [], 0
    for block, widths in enumerate(_VGG_BLOCKS, start=1):
        index += (1 if block > 1 else 0) + 2 * len(widths)
        ends.append(index)
    return ends


def read_state_dict(source: str | os.PathLike, *, what: str) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``.safetensors`` or a torch file loaded with
    ``weights_only=True`` (``safe_pickle.safe_torch_load``: a Lightning checkpoint's callbacks and
    hyper-parameters become inert stand-ins; its ``state_dict`` is unwrapped), locally or from
    ``hf://owner/repo/file``."""
    if is_hf_source(source):
        repo_id, filename = parse_hf_source(str(source))
        if not filename:
            raise ValueError(f"{what}: {source!r} names a repository, not a file; use hf://owner/repo/file")
        path = hf_download(repo_id, filename, source=str(source))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what}: weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    from .safe_pickle import safe_torch_load  # weights_only; Lightning objects -> inert stand-ins

    obj = safe_torch_load(path, what=what)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{what}: {str(path)!r} is not a state dict of tensors (got {type(obj).__name__}); pass a "
            "file saved with torch.save(model.state_dict()) or a .safetensors file"
        )
    return {str(k): v for k, v in obj.items()}


def make_perceptual_loss(
    source: str | os.PathLike | None,
    logger: logging.Logger | None = None,
    *,
    vgg: str | os.PathLike | None = None,
) -> LPIPS | None:
    """The trainer's LPIPS: :meth:`LPIPS.from_file` when ``source`` is given, else ``None`` after
    one warning on ``logger`` that training proceeds without the perceptual loss."""
    log = logger if logger is not None else _logger
    if source is None or str(source) == "":
        log.warning(
            "No LPIPS weights given: training the VQ-GAN without the perceptual loss (reconstruction "
            "and GAN losses only). Pass a taming training checkpoint or LPIPS weights (plus a "
            "VGG16 state dict) to enable it; nothing is downloaded automatically."
        )
        return None
    model = LPIPS.from_file(source, vgg=vgg)
    log.info("LPIPS perceptual loss loaded from %s", source)
    return model
