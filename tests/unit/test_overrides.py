"""lab/experiments/overrides.py: a grid's or sweep's `overrides:` and the `--set` flags, read
by one parser; their values as the resolved config holds them; the keys neither may set;
each refusal one LabError line. (The same refusals through `gatelab grid` and `gatelab
sweep`, exit code 2 and nothing recorded: tests/integration/test_cli_bad_input.py.)"""

from __future__ import annotations

import pytest

from lab.config import resolve
from lab.errors import LabError
from lab.experiments.overrides import AXIS_OVERRIDES, override_pairs, read_overrides

GATED = "sdpa_elementwise_sigmoid_mul"


def test_nothing_to_read_is_no_override():
    assert read_overrides("overrides", None, "grid") == {}
    assert read_overrides("--set", [], "grid") == {}
    assert read_overrides("overrides", {}, "sweep") == {}


def test_a_mapping_keeps_its_yaml_types_and_pairs_stay_text():
    mapping = {"train.val_every": 50, "model.qk_norm": False, "train.warmup_fraction": 0,
               "gate.activation": "silu"}
    assert read_overrides("overrides", mapping, "grid") == mapping
    pairs = ["train.val_every=50", " model.qk_norm = false ", "data.source=a=b.txt"]
    assert read_overrides("--set", pairs, "grid") == {
        "train.val_every": "50", "model.qk_norm": "false", "data.source": "a=b.txt"}


def test_the_returned_mapping_is_a_copy():
    mapping = {"train.val_every": 50}
    read = read_overrides("overrides", mapping, "grid")
    read["train.val_every"] = 1
    assert mapping == {"train.val_every": 50}


@pytest.mark.parametrize("text, field, value", [
    ("train.val_every=50", ("train", "val_every"), 50),
    ("train.warmup_fraction=0.2", ("train", "warmup_fraction"), 0.2),
    ("train.grad_clip=1", ("train", "grad_clip"), 1.0),     # text in a float field: a float
    ("model.qk_norm=false", ("model", "qk_norm"), False),
    ("model.qk_norm=1", ("model", "qk_norm"), True),
    ("train.compile_mode=max-autotune", ("train", "compile_mode"), "max-autotune"),
    ("data.valid=none", ("data", "valid"), None),
    # text fields whose default is the word "none" (the error for liger on a CPU says to
    # pass train.fused_loss=none; it was read as None and refused)
    ("train.fused_loss=none", ("train", "fused_loss"), "none"),
    ("model.sdpa_transform=none", ("model", "sdpa_transform"), "none"),
])
def test_text_values_are_read_by_the_type_of_their_field(text, field, value):
    overrides = read_overrides("--set", [text], "grid")
    section, name = field
    resolved = getattr(getattr(resolve(GATED, "tiny", overrides), section), name)
    assert resolved == value and type(resolved) is type(value)


def test_none_clears_a_text_field_that_may_be_none_though_a_variant_set_it():
    """model.switch_head is `str | None`, and a Switch Head variant sets it: `none` still
    reads as None there (the rule for train.fused_loss's word "none" is its type's, not
    the text it holds now)."""
    pairs = ["model.switch_head=none", "model.switch_head_added_fraction=none"]
    config = resolve("switchhead_kv_4top4", "tiny", read_overrides("--set", pairs, "grid"))
    assert config.model.switch_head is None and config.model.switch_head_added_fraction is None


def test_a_yaml_int_in_a_float_field_stays_an_int_as_the_config_hash_holds_it():
    """docs: lab/config.py; a grid written `train.min_lr_ratio: 0` keeps the int, so its
    cells' config hashes are those the store holds (tests/unit/test_config.py's golden hashes)."""
    config = resolve(GATED, "tiny", read_overrides("overrides", {"train.min_lr_ratio": 0}, "grid"))
    assert type(config.train.min_lr_ratio) is int


@pytest.mark.parametrize("pair, expected", [
    ("train.val_every=2.5", "train.val_every: expected a int, got '2.5'"),
    ("train.val_every=lots", "train.val_every: expected a int, got 'lots'"),
    ("train.grad_clip=big", "train.grad_clip: expected a float, got 'big'"),
    ("model.qk_norm=maybe", "model.qk_norm: expected true or false, got 'maybe'"),
    ("train.val_every=inf", "train.val_every: expected a int, got 'inf'"),
])
def test_a_text_value_its_field_cannot_take_is_refused_when_resolved(pair, expected):
    overrides = read_overrides("--set", [pair], "grid")  # the key is valid: read_overrides passes
    with pytest.raises(LabError) as refused:
        resolve(GATED, "tiny", overrides)
    assert str(refused.value) == expected


@pytest.mark.parametrize("key", sorted(AXIS_OVERRIDES))
@pytest.mark.parametrize("kind", ["grid", "sweep"])
def test_an_axis_of_the_grid_or_sweep_is_refused_naming_the_field_that_sets_it(key, kind):
    field = {"grid": {"train.lr": "lrs", "train.seed": "seeds", "train.tokens": "tokens"},
             "sweep": {"train.lr": "lr", "train.seed": "seeds", "train.tokens": "tokens"}}
    message = f"{{where}}.{key}: set this with the {kind}'s `{field[kind][key]}` field"
    with pytest.raises(LabError) as refused:
        read_overrides("overrides", {key: 1}, kind)
    assert str(refused.value) == message.format(where="overrides")
    with pytest.raises(LabError) as refused:
        read_overrides("--set", [f"{key}=1"], kind)
    assert str(refused.value) == message.format(where="--set")


@pytest.mark.parametrize("value, expected", [
    ("train.val_every=5", "overrides: expected a mapping of dotted keys, e.g. {train.val_every: "
                          "50}, or a list of 'key=value', got 'train.val_every=5'"),
    (["train.val_every=5", 3], "overrides: expected a mapping of dotted keys, e.g. "
                               "{train.val_every: 50}, or a list of 'key=value', got "
                               "['train.val_every=5', 3]"),
    (7, "overrides: expected a mapping of dotted keys, e.g. {train.val_every: 50}, or a list "
        "of 'key=value', got 7"),
    ({1: 2}, "overrides: keys are dotted field names, got 1"),
    ({"train.val_every": [1, 2]}, "overrides.train.val_every: expected a single value, got "
                                  "[1, 2]"),
    ({"gate.activation": {"name": "silu"}}, "overrides.gate.activation: expected a single "
                                            "value, got {'name': 'silu'}"),
    ({"optim.lr": 1}, "override 'optim.lr': keys look like section.field with section one of "
                      "model, train, data, gate"),
    ({"train": 1}, "override 'train': keys look like section.field with section one of model, "
                   "train, data, gate"),
    (["train.val_every"], "--set: expected key=value, got 'train.val_every'"),
])
def test_a_malformed_override_is_one_line_naming_where_it_was(value, expected):
    with pytest.raises(LabError) as refused:
        read_overrides("overrides", value, "grid")
    assert str(refused.value) == expected and "\n" not in expected


def test_an_unknown_field_is_named_with_the_fields_its_section_has():
    with pytest.raises(LabError) as refused:
        read_overrides("overrides", {"train.nope": 1}, "sweep")
    message = str(refused.value)
    assert message.startswith("override 'train.nope': unknown field 'nope' of train; allowed: ")
    allowed = message.split("allowed: ")[1].split(", ")
    assert allowed == sorted(allowed) and {"val_every", "warmup_fraction", "lr"} <= set(allowed)


def test_override_pairs_is_the_set_form_and_reads_back_to_the_same_config():
    """`gatelab check` takes a grid's overrides as `--set` pairs: each value's text, read by
    its field's type, gives the config the grid's own values give."""
    overrides = {"train.val_every": 7, "model.qk_norm": False, "train.warmup_fraction": 0.25,
                 "gate.activation": "silu", "train.compile_mode": "max-autotune"}
    pairs = override_pairs(overrides)
    assert pairs == ["train.val_every=7", "model.qk_norm=False", "train.warmup_fraction=0.25",
                     "gate.activation=silu", "train.compile_mode=max-autotune"]
    assert resolve(GATED, "tiny", read_overrides("--set", pairs, "grid")) == \
        resolve(GATED, "tiny", read_overrides("overrides", overrides, "grid"))
    assert override_pairs({}) == []
