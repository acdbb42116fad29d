"""Files we write are readable by other users as the umask allows (issue #13 item 7): a
ComfyUI running as another user must be able to read a trained model. ``atomic_write`` used to
leave every file at mode 0600 (``mkstemp``)."""

from __future__ import annotations

import os
import stat
import sys

import pytest
import torch
from comfyui_sundae.sundae_lib import (
    VQGAN,
    PriorConfig,
    SundaePrior,
    VQGANConfig,
    save_prior,
    save_vqgan,
)
from comfyui_sundae.sundae_lib._helpers import atomic_write, current_umask
from comfyui_sundae.trainer.checkpoint import CheckpointManager
from comfyui_sundae.trainer.runtime import save_grid

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask  # unchanged by reading


def test_everything_written_atomically_gets_the_umask_mode(tmp_path, umask):
    want = 0o666 & ~umask  # 0644 under 022
    text = tmp_path / "a.txt"
    atomic_write(text, lambda tmp: open(tmp, "w").write("x"))
    prior = tmp_path / "prior.safetensors"
    save_prior(SundaePrior(PriorConfig.preset("tiny")), prior)
    vq = tmp_path / "vq.safetensors"
    save_vqgan(VQGAN(VQGANConfig.preset("tiny")), vq)
    png = save_grid(torch.zeros(2, 1, 4, 4), tmp_path / "samples" / "grid.png")
    ckpt = CheckpointManager(tmp_path / "ck").save(
        1, {"model.safetensors": lambda p: save_prior(SundaePrior(PriorConfig.preset("tiny")), p),
            "training_state.pt": lambda p: torch.save({"step": 1}, p)}, meta={})
    files = [text, prior, vq, png, *sorted(ckpt.iterdir()), tmp_path / "ck" / "latest.json"]
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(want) for f in files}
    # replacing an existing file gives the same mode too
    os.chmod(prior, 0o600)
    save_prior(SundaePrior(PriorConfig.preset("tiny")), prior)
    assert _mode(prior) == want


def test_save_grid_frames_a_grid_but_not_a_single_image(tmp_path):
    from PIL import Image

    one = save_grid(torch.zeros(1, 1, 28, 28), tmp_path / "one.png")
    assert Image.open(one).size == (28, 28)  # feeds back into inpaint as the same 28x28 image
    two = save_grid(torch.zeros(2, 1, 28, 28), tmp_path / "two.png")
    assert Image.open(two).size == (2 + 2 * 30, 2 + 30)  # 2 px gaps around and between
