"""lab/config.py: what makes a grid cell's identity, and how fields are checked."""

import hashlib
import json

import pytest

from lab.config import ANALYSIS_FIELDS, LATER_FIELDS, resolve
from lab.errors import LabError


def test_fields_added_later_keep_old_cell_identities_at_their_default():
    plain = resolve("baseline", "tiny")
    assert ("model", "residual_init_scale") in LATER_FIELDS
    # The identity a store recorded before the fields existed: the same dict without them.
    raw = plain.to_dict()
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in ANALYSIS_FIELDS}
    for section, name in LATER_FIELDS:
        del raw[section][name]
    assert raw["train"]["compile"] == "auto"
    raw["train"]["compile"] = False  # the default those stores were recorded with
    old = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert plain.hash() == old
    assert resolve("baseline", "tiny", ["model.residual_init_scale=0.5"]).hash() != old
    # The reproduction's stores: this cell's identity as recorded on the GPUs (docs/results.md).
    assert resolve("baseline", "small", ["data.bos_prefix=true"]).hash() == "6e04235c3185cb35"


def test_compile_auto_keeps_the_identity_of_compile_false():
    """compile is speed, not the model: the new default ("auto") resumes old grids, whose
    cells were recorded with compile false; forcing it on is another cell, as before."""
    auto = resolve("baseline", "tiny")
    assert auto.train.compile == "auto"
    assert auto.hash() == resolve("baseline", "tiny", ["train.compile=false"]).hash()
    forced = resolve("baseline", "tiny", ["train.compile=true"])
    assert forced.train.compile is True and forced.hash() != auto.hash()
    assert auto.train.compile_on(cuda=True) and not auto.train.compile_on(cuda=False)
    with pytest.raises(LabError, match="train.compile"):
        resolve("baseline", "tiny", ["train.compile=sometimes"])


def test_analysis_fields_do_not_change_the_identity():
    plain = resolve("baseline", "tiny")
    more = resolve("baseline", "tiny", ["train.analysis_windows=3"])
    assert plain.hash() == more.hash()
    assert resolve("baseline", "tiny", ["train.lr=1e-3"]).hash() != plain.hash()


def test_compile_mode_is_checked_before_training():
    from lab.errors import LabError

    assert resolve("baseline", "tiny", ["train.compile_mode=reduce-overhead"]).train.compile_mode \
        == "reduce-overhead"
    with pytest.raises(LabError, match="train.compile_mode"):
        resolve("baseline", "tiny", ["train.compile_mode=fast"]).validate()


def test_auto_precision_is_bf16_on_gpu_and_float32_on_cpu():
    auto = resolve("baseline", "tiny").train
    assert (auto.precision_on(True), auto.precision_on(False)) == ("bf16-mixed", "32-true")
    fixed = resolve("baseline", "tiny", ["train.precision=32-true"]).train
    assert fixed.precision_on(True) == "32-true"


@pytest.mark.parametrize("override, field", [
    ("train.seed=-1", "train.seed"), ("train.analysis_windows=-2", "train.analysis_windows"),
    ("train.analysis_every=-1", "train.analysis_every")])
def test_non_negative_integer_fields_refuse_negatives_with_one_message(override, field):
    with pytest.raises(LabError, match=f"^{field}: must be a non-negative integer, got -"):
        resolve("baseline", "tiny", [override])


def identity_before_issue_24(config) -> str:
    """The identity a store recorded before issue 24's fields existed."""
    raw = config.to_dict()
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in ANALYSIS_FIELDS}
    for section, name in LATER_FIELDS:
        raw[section].pop(name)
    raw["train"]["compile"] = False  # what "auto" was recorded as
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_issue_24_changes_the_identity_of_exactly_the_cells_it_retrains():
    unchanged = ["baseline", "sdpa_elementwise_sigmoid_mul", "baseline_kv8", "switchhead_v_1top1"]
    for slug in unchanged:
        config = resolve(slug, "small")
        assert config.hash() == identity_before_issue_24(config), slug
    # b is no longer decayed, the Switch Head experts are low-rank: stored cells are stale.
    for slug in ["sdpa_input_independent_sigmoid_mul", "switchhead_kv_8top8", "switchhead_v_8top2"]:
        config = resolve(slug, "small")
        assert config.hash() != identity_before_issue_24(config), slug
    constant = "sdpa_input_independent_sigmoid_mul"
    assert resolve(constant, "small").hash() != \
        resolve(constant, "small", ["train.gate_constant_decay=true"]).hash()
