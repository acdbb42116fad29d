"""``sundae-train``: the training / sampling CLI of comfyui-sundae.

Commands (``sundae-train --help``): ``vqgan`` (train a VQ-GAN codec), ``latents`` (encode an image
dataset into a token dataset), ``prior`` (train a SUNDAE prior), ``sample`` / ``inpaint`` (PNG
outputs from a trained prior) and ``env`` (versions for bug reports). ``python -m
comfyui_sundae.trainer`` runs the same CLI, which is what ``torchrun`` launches.

Importing this package is cheap: torch and ``sundae_lib`` load inside the commands.
"""

from __future__ import annotations

__all__: list[str] = []
