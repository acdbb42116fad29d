"""sundae-train sample / inpaint refuse bad inputs with one line that names the value, what is
allowed and what to do (no traceback, no raw torch message, nothing silently clipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from comfyui_sundae.sundae_lib import save_prior
from comfyui_sundae.sundae_lib.prior_metadata import parse_label_map
from comfyui_sundae.trainer.cli import main
from conftest import tiny_prior
from PIL import Image

PIXEL16 = {"sundae.codec": "pixel:levels=16,channels=1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _prior(path, *, num_classes=0, label_map=None):
    model = tiny_prior(seed=0, grid=(4, 4), num_classes=num_classes)
    meta = dict(PIXEL16)
    if label_map is not None:
        meta["sundae.label_map"] = label_map if isinstance(label_map, str) else json.dumps(label_map)
    save_prior(model, path, metadata=meta)
    return str(path)


@pytest.fixture()
def files(tmp_path):
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(tmp_path / "digit.png")
    (tmp_path / "notes.txt").write_text("not an image\n")
    return tmp_path


def _run(args):
    return CliRunner().invoke(main, args)


def _one_line_error(res, code=1):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


def test_non_image_input_is_a_one_line_error(files):
    model = _prior(files / "p.safetensors")
    res = _run(["inpaint", "-m", model, "-i", str(files / "notes.txt"), "--box", "0,0,1,1", "--steps", "2"])
    _one_line_error(res)
    assert "--image" in res.output and "notes.txt" in res.output and "is not an image" in res.output
    res = _run(["inpaint", "-m", model, "-i", str(files / "digit.png"), "--mask", str(files / "notes.txt"),
                "--steps", "2"])
    _one_line_error(res)
    assert "--mask" in res.output and "is not an image" in res.output


@pytest.mark.parametrize("command", ["inpaint", "sample"])
@pytest.mark.parametrize("option", ["-n", "--batch-size"])
def test_counts_below_one_are_usage_errors(files, command, option):
    model = _prior(files / "p.safetensors")
    extra = ["-i", str(files / "digit.png"), "--box", "0,0,2,2"] if command == "inpaint" else []
    res = _run([command, "-m", model, *extra, option, "0", "--steps", "2"])
    _one_line_error(res, code=2)
    assert "0 is not in the range x>=1" in res.output


@pytest.mark.parametrize("box", ["4,4,8,2", "0,6,8,4", "-1,0,2,2", "0,0,0,3", "8,0,1,1"])
def test_box_outside_the_image_is_refused_not_clipped(files, box):
    model = _prior(files / "p.safetensors")
    res = _run(["inpaint", "-m", model, "-i", str(files / "digit.png"), "--box", box, "--steps", "2",
                "--out", str(files / "out.png")])
    _one_line_error(res)
    assert f"--box '{box}'" in res.output and "does not lie inside the 8x8 image" in res.output
    assert "X+W <= 8 and Y+H <= 8" in res.output
    assert not (files / "out.png").exists()


def test_box_touching_the_edges_still_works(files):
    model = _prior(files / "p.safetensors")
    res = _run(["inpaint", "-m", model, "-i", str(files / "digit.png"), "--box", "4,0,4,8", "-n", "1",
                "--steps", "2", "--out", str(files / "out.png")])
    assert res.exit_code == 0, res.output
    assert (files / "out.png").is_file()


@pytest.mark.parametrize(
    "label_map",
    [["cat", "dog"], {"0": "cat", "1": "dog"}, {"cat": 0, "dog": 1}],
    ids=["list", "id-to-name", "name-to-id"],
)
def test_label_map_as_list_or_dict_gives_names(files, label_map):
    model = _prior(files / "p.safetensors", num_classes=2, label_map=label_map)
    assert parse_label_map(json.dumps(label_map)) == ("cat", "dog")
    res = _run(["sample", "-m", model, "--class", "dog", "-n", "2", "--steps", "2", "--out", str(files / "s.png")])
    assert res.exit_code == 0, res.output
    res = _run(["sample", "-m", model, "--class", "cow", "-n", "1", "--steps", "2", "--out", str(files / "s.png")])
    _one_line_error(res)
    assert "--class 'cow'" in res.output and "'cat', 'dog'" in res.output


def test_unusable_label_map_is_ignored_ids_still_work(files):
    model = _prior(files / "p.safetensors", num_classes=2, label_map='{"a": [1, 2]}')
    res = _run(["sample", "-m", model, "--class", "1", "-n", "1", "--steps", "2", "--out", str(files / "s.png")])
    assert res.exit_code == 0, res.output
    with pytest.raises(ValueError, match="neither a list of class names nor a dict"):
        parse_label_map("42")
