"""lab/config.py and lab/identity.py: what makes a grid cell's identity, and how fields are checked."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from lab.config import resolve
from lab.errors import LabError
from lab.identity import ANALYSIS_FIELDS, LATER_FIELDS, SPEED_FIELDS

REPO = Path(__file__).resolve().parents[2]


def test_fields_added_later_keep_old_cell_identities_at_their_default():
    plain = resolve("baseline", "tiny")
    assert ("model", "residual_init_scale") in LATER_FIELDS
    # The identity a store recorded before the fields existed: the same dict without them.
    raw = plain.to_dict()
    raw["train"] = {k: v for k, v in raw["train"].items()
                    if k not in ANALYSIS_FIELDS + SPEED_FIELDS}
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


def test_the_compile_mode_is_speed_and_leaves_the_identity_alone():
    """deep-narrow replays CUDA graphs since 2026-12-06; the stability ladder's cell that
    finished before, in the default mode, is still done (its hash as the GPU recorded it,
    docs/store/stability.tar.xz)."""
    from lab.config import with_vocab
    from lab.experiments.schema import load_grid

    spec = load_grid(REPO / "ablations" / "stability.yaml")

    def ladder_cell(*extra: str):
        overrides = [*(f"{k}={v}" for k, v in spec.overrides.items()), *extra]
        config = resolve("baseline", spec.preset, overrides, data=spec.data, tokens=spec.tokens,
                         seed=0, lr=3e-3)
        return with_vocab(config, 16384)  # the prepared corpus's vocabulary

    graphs = ladder_cell()
    assert graphs.train.compile_mode == "reduce-overhead"
    assert graphs.hash() == "b29436bfdbb10c6f"
    assert ladder_cell("train.compile_mode=default").hash() == graphs.hash()
    assert resolve("baseline", "small").train.compile_mode == "default"


def test_the_graphs_check_grid_trains_the_ladders_g1_cell_without_cuda_graphs():
    """ablations/stability-graphs-check.yaml: G1 elementwise, seed 0, LR 3e-2 of the ladder,
    in the default compile mode: the same cell (hash) the ladder trained under CUDA graphs."""
    from lab.config import with_vocab
    from lab.experiments.schema import load_grid

    def cells(name: str) -> dict:
        """The grid's cells as resolved configs, without the corpus (absent in a clean clone):
        its vocabulary as the prepared corpus's."""
        spec = load_grid(REPO / "ablations" / f"{name}.yaml")
        overrides = [f"{k}={v}" for k, v in spec.overrides.items()]
        return {(variant, seed, lr): with_vocab(resolve(variant, spec.preset, overrides,
                                                        data=spec.data, tokens=spec.tokens,
                                                        seed=seed, lr=lr), 16384)
                for variant in spec.variants for seed in spec.seeds for lr in spec.lrs}

    (key, check), = cells("stability-graphs-check").items()
    ladder = cells("stability")[key]
    assert key == ("sdpa_elementwise_sigmoid_mul", 0, 3e-2)
    assert (check.train.compile_mode, ladder.train.compile_mode) == ("default", "reduce-overhead")
    assert check.hash() == ladder.hash() == "6636932856c11626"  # as the GPU recorded it


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
    raw["train"] = {k: v for k, v in raw["train"].items()
                    if k not in ANALYSIS_FIELDS + SPEED_FIELDS}
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


def test_the_token_budget_is_at_least_one_step_and_at_most_the_wall_time_bound():
    from lab.config import MAX_RUN_DAYS
    from lab.model.flops import PEAK_BF16_TFLOPS, flops_per_token_lower_bound

    one_step = 16 * 128  # tiny: batch_size x context
    assert resolve("baseline", "tiny", tokens=one_step).train.tokens == one_step
    with pytest.raises(LabError, match=f"less than one optimizer step .* = {one_step:,} tokens"):
        resolve("baseline", "tiny", tokens=one_step - 1)
    peak = max(value for _, value in PEAK_BF16_TFLOPS) * 1e12
    most = MAX_RUN_DAYS * 86400 * peak / flops_per_token_lower_bound(resolve("baseline", "tiny").model)
    resolve("baseline", "tiny", tokens=most * 0.99)
    with pytest.raises(LabError, match=r"take at least 30\.3 days on 1 device.* at most "
                                       + re.escape(f"{most:.3g} tokens fit in {MAX_RUN_DAYS} days")):
        resolve("baseline", "tiny", tokens=most * 1.01)
    # Two devices double what fits.
    resolve("baseline", "tiny", ["train.devices=2"], tokens=most * 1.9)


@pytest.mark.parametrize("value, message", [
    (2.5, "train.batch_size: expected an integer, got 2.5"),
    (True, "train.batch_size: expected an integer, got True"),
    ("16", "train.batch_size: expected an integer, got '16'"),
])
def test_every_field_holds_its_declared_type(value, message):
    import dataclasses

    config = resolve("baseline", "tiny")
    bad = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=value))
    with pytest.raises(LabError, match=f"^{message}$"):
        bad.validate()


def test_yaml_numbers_keep_their_type_and_so_the_cell_identity():
    """An int from a grid file in a float field stays an int: converting it would change
    the config hash of every stored cell that was written with it."""
    config = resolve("baseline", "tiny", {"train.weight_decay": 0, "model.qk_norm": False})
    assert config.train.weight_decay == 0 and isinstance(config.train.weight_decay, int)
