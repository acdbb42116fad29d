"""Pure helpers of benchmarks/eval_emoji.py (and its emoji_metrics.py) on hand-made inputs whose
answers are worked out by hand (the benchmark itself needs the trained models and is run by
hand)."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def ev(repo_root):
    folder = str(repo_root / "benchmarks")
    sys.path.insert(0, folder)  # as `python benchmarks/eval_emoji.py` has it: finds emoji_metrics
    spec = importlib.util.spec_from_file_location("eval_emoji", repo_root / "benchmarks" / "eval_emoji.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_emoji"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("eval_emoji", None)
        sys.modules.pop("emoji_metrics", None)
        sys.path.remove(folder)


def test_frechet_one_dimension(ev):
    # means 1 and 4, both variances 2 (ddof 1): 3^2 + 2 + 2 - 2 sqrt(2 * 2) = 9
    assert ev.frechet(np.array([[0.0], [2.0]]), np.array([[3.0], [5.0]])) == pytest.approx(9.0)


def test_frechet_shift_and_scale(ev):
    f1 = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # mean 0, cov (2/3) I
    assert ev.frechet(f1, f1) == pytest.approx(0.0, abs=1e-12)
    assert ev.frechet(f1, f1 + np.array([3.0, 4.0])) == pytest.approx(25.0)  # |shift|^2
    # S2 = 4 S1: tr S1 + 4 tr S1 - 2 tr(2 S1) = tr S1 = 4/3
    assert ev.frechet(f1, 2 * f1) == pytest.approx(4 / 3)


def test_nearest_training_image(ev):
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]]).reshape(3, 1, 1, 2)
    queries = torch.tensor([[3.0, 3.0], [9.0, 0.0], [0.0, 0.0]]).reshape(3, 1, 1, 2)
    dist, idx = ev.nearest(queries, bank)
    assert idx.tolist() == [1, 2, 0]
    assert dist.tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_near_copy_rule(ev):
    # near-identical = distance <= threshold (the codec round-trip median): 1, 2, 3 of 5
    rep = ev.copy_report(torch.tensor([4.0, 1.0, 10.0, 3.0, 2.0], dtype=torch.float64), 3.0)
    assert rep["near_identical_share"] == pytest.approx(0.6)
    assert rep["median"] == 3.0 and rep["min"] == 1.0
    assert rep["p10"] == pytest.approx(1.4)  # linear: 1 + 0.4 * (2 - 1)


def test_accuracy_report(ev):
    # class 0: 1 of 1 right; class 1: 1 of 3 right (judged 0, 1, 2); class 2 absent
    rep = ev.accuracy_report(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 3)
    assert rep["accuracy"] == 0.5
    assert rep["per_class"][0] == 1.0 and rep["per_class"][1] == pytest.approx(1 / 3)
    assert rep["per_class"][2] is None  # left out of the balanced mean
    assert rep["balanced_accuracy"] == pytest.approx(2 / 3)


def test_token_masks_and_grey_out(ev):
    masks = ev.token_masks(16, 16)
    centre, bottom = masks["centre"], masks["bottom"]
    assert int(centre.sum()) == 64 and centre[4:12, 4:12].all()
    assert int(bottom.sum()) == 128 and bottom[8:].all()
    x = torch.zeros(1, 3, 64, 64)
    grey = ev.grey_out(x, centre, 4)  # tokens 4..11 = pixels 16..47
    assert grey[..., 16:48, 16:48].eq(0.5).all()
    assert int(grey.eq(0.5).sum()) == 3 * 32 * 32
    assert math.isclose(float(grey.sum()), 0.5 * 3 * 32 * 32)
