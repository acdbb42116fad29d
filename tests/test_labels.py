"""Class labels by id or name: one resolver (``sundae_lib.labels``) behind the prior, the loss,
``sample()``, the ComfyUI sampler and the CLI; wrong names are refused with the valid ones."""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_sundae.nodes import NODE_CLASS_MAPPINGS
from comfyui_sundae.nodes.types import PriorHandle
from comfyui_sundae.sundae_lib import (
    PriorConfig,
    SundaePrior,
    load_prior,
    resolve_class,
    sample,
    save_prior,
    sundae_loss,
)
from comfyui_sundae.sundae_lib.labels import LabelSpace, resolve_labels

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
EMOJI = ["Smileys & Emotion", "People & Body", "Animals & Nature"]


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A tiny 3-class prior whose file names its classes like the emoji prior."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("labels") / "p.safetensors"
    save_prior(SundaePrior(PriorConfig.preset("tiny", num_classes=3)), path,
               metadata={"sundae.label_map": json.dumps(EMOJI)})
    return load_prior(path)


@pytest.mark.parametrize("value, want", [
    (2, 2), ("2", 2), ("Animals & Nature", 2), ("  animals & nature ", 2), ("People & Body", 1),
    (-1, -1), ("-1", -1), ("none", -1), ("None", -1), ("null", -1), ("", -1),
])
def test_a_class_by_id_name_or_null_word(named, value, want):
    assert resolve_class(named, value) == want


def test_a_wrong_name_lists_the_valid_ones(named):
    with pytest.raises(ValueError, match=r"label 'Animal' is not a class of this prior; use a class id 0..2 or a "
                                         r"name: 'Smileys & Emotion', 'People & Body', 'Animals & Nature' or -1"):
        resolve_class(named, "Animal")
    with pytest.raises(ValueError, match=r"label 3 is out of range: this prior has 3 classes"):
        resolve_class(named, 3)
    with pytest.raises(ValueError, match="give a class id"):
        resolve_class(named, 1.5)


def test_names_of_the_map_win_over_ids_and_long_maps_are_shortened():
    space = LabelSpace(3, True, ("1", "0", "two"))
    assert space.resolve("1") == 0 and space.resolve("0") == 1 and space.resolve(2) == 2
    many = LabelSpace(40, False, tuple(f"c{i}" for i in range(40)))
    assert "... (40 in all)" in many.allowed() and "no null class" in many.allowed()
    with pytest.raises(ValueError, match="no null class"):
        many.resolve("none")


def test_unconditional_priors_take_only_the_null_class():
    space = LabelSpace(0, False)
    assert space.resolve("none") == -1 and space.resolve(-1) == -1
    with pytest.raises(ValueError, match="unconditional"):
        space.resolve("3")


def test_sample_and_loss_accept_names(named):
    g = torch.Generator
    by_name = sample(named, batch_size=2, steps=2, labels=["Animals & Nature", "none"], generator=g().manual_seed(1))
    by_id = sample(named, batch_size=2, steps=2, labels=[2, -1], generator=g().manual_seed(1))
    assert torch.equal(by_name, by_id)
    t = resolve_labels(named, "People & Body", 3, CPU, "test")
    assert t.tolist() == [1, 1, 1]
    tokens = torch.randint(0, 16, (2, 8, 8))
    a = sundae_loss(named, tokens, ["Smileys & Emotion", 2], generator=g().manual_seed(2), class_dropout=0.0)
    b = sundae_loss(named, tokens, [0, 2], generator=g().manual_seed(2), class_dropout=0.0)
    assert torch.equal(a, b)
    logits = named(tokens, torch.tensor([0, -1]))  # the prior's own check maps -1 to the null row
    assert torch.equal(logits, named(tokens, [0, -1]))


def _node(prior, class_label):
    args = dict(seed=0, steps=2, temperature_start=1.0, temperature_end=0.7, update_start=1.0, update_end=1.0,
                early_stop=False, batch_size=1, class_label=class_label, cfg_scale=1.0, strength=1.0, width=0,
                height=0)
    handle = PriorHandle(prior, "named.safetensors", CPU, torch.float32)
    with torch.inference_mode():
        return NODE_CLASS_MAPPINGS["SundaeSampler"]().run(handle, **args)[0].tokens


def test_node_takes_a_name_an_id_string_or_an_old_workflows_int(named):
    by_name = _node(named, "Animals & Nature")
    assert torch.equal(by_name, _node(named, "2")) and torch.equal(by_name, _node(named, 2))
    assert not torch.equal(by_name, _node(named, "People & Body"))
    assert torch.equal(_node(named, "none"), _node(named, -1))  # old workflows stored -1


def test_node_wrong_name_says_which_names_exist(named):
    with pytest.raises(ValueError, match=r"SundaeSampler: class_label 'Flags' is not a class of this prior; use a "
                                         r"class id 0..2 or a name: 'Smileys & Emotion'"):
        _node(named, "Flags")


def test_shipped_emoji_prior_knows_its_category_names():
    prior = load_prior("emoji")
    assert resolve_class(prior, "Animals & Nature") == json.loads(prior.metadata["sundae.label_map"]).index(
        "Animals & Nature")


def test_numpy_integer_labels_are_accepted_like_ints(named):
    import numpy as np

    cases = [(np.int64(2), [2, 2]), (np.array([0, -1]), [0, -1]), ([np.int32(1), "Animals & Nature"], [1, 2])]
    for labels, want in cases:
        assert resolve_labels(named, labels, 2, CPU, "t").tolist() == want
    with pytest.raises(ValueError, match="labels must be"):
        resolve_labels(named, np.array([0.5, 1.0]), 2, CPU, "t")  # floats are not class ids
