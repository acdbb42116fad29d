"""``python -m comfyui_sundae.trainer`` == ``sundae-train`` (and what ``torchrun -m`` runs)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main(prog_name="sundae-train")
