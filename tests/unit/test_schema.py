"""lab/experiments/schema.py: a file that `extends` another (the control grids of ablations/),
the refusals, defaults and nulls of one file, and the flags that replace its values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lab.errors import LabError
from lab.experiments.schema import (MAX_EXTENDS, GridSpec, check_finite_numbers, grid_from_dict,
                                    load_grid, with_cli)
from lab.experiments.sweep.spec import load_sweep

BASE = """name: parent
preset: tiny
tokens: 4096
variants: [baseline, sdpa_elementwise_sigmoid_mul]
seeds: [0, 1]
lrs: [3e-3]
overrides:
  train.val_every: 20
  train.log_every: 5
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_child_replaces_keys_adds_overrides_and_drops_what_it_sets_to_null(tmp_path):
    write(tmp_path, "parent.yaml", BASE)
    child = write(tmp_path, "child.yaml", "extends: parent.yaml\nname: child\n"
                  "variants: [baseline]\nseeds: null\n"
                  "overrides:\n  train.log_every: 10\n  model.qk_norm: false\n")
    spec = load_grid(child)
    assert spec.name == "child" and spec.variants == ("baseline",)
    assert spec.preset == "tiny" and spec.tokens == 4096 and spec.lrs == (3e-3,)
    assert spec.seeds == (0,)  # null: the parent's [0, 1] dropped, the default back
    assert spec.overrides == {"train.val_every": 20, "train.log_every": 10,
                              "model.qk_norm": False}


def test_extends_follows_a_chain_relative_to_each_file_and_lists_of_pairs_merge_too(tmp_path):
    write(tmp_path, "grids/parent.yaml", BASE)
    write(tmp_path, "grids/sub/middle.yaml", "extends: ../parent.yaml\nname: middle\n"
          "overrides: ['train.val_every=40']\n")
    leaf = write(tmp_path, "leaf.yaml", "extends: grids/sub/middle.yaml\nname: leaf\n"
                 "lrs: [1e-3]\n")
    spec = load_grid(leaf)
    assert spec.name == "leaf" and spec.lrs == (1e-3,)
    assert spec.overrides == {"train.val_every": "40", "train.log_every": 5}
    assert spec.variants == ("baseline", "sdpa_elementwise_sigmoid_mul")


def test_a_sweep_file_extends_another_and_its_storage_is_found_by_name(tmp_path, monkeypatch):
    from lab.experiments.sweep.storage import storage_url

    monkeypatch.chdir(tmp_path)
    write(tmp_path, "sweeps/lr.yaml", "name: lr\npreset: tiny\nvariants: [baseline]\n"
          "lr: {ladder: [1e-3, 3e-3]}\nstorage: sweeps/shared.journal\n")
    write(tmp_path, "sweeps/lr-noqk.yaml", "extends: lr.yaml\nname: lr-noqk\n"
          "overrides: {model.qk_norm: false}\n")
    sweep = load_sweep("sweeps/lr-noqk.yaml")
    assert sweep.name == "lr-noqk" and sweep.grid()["lr"] == [1e-3, 3e-3]
    assert sweep.overrides == {"model.qk_norm": False}
    assert storage_url("lr-noqk") == "sweeps/shared.journal"


@pytest.mark.parametrize("files, expected", [
    ({"child.yaml": "extends: parent.yaml\nvariants: [baseline]\n"},
     r"child.yaml: missing field 'name' \(a file that extends another names its own"),
    ({"child.yaml": "extends: nosuch.yaml\nname: child\n"}, "extends: .*nosuch.yaml not found"),
    ({"child.yaml": "extends: [parent.yaml]\nname: child\n"},
     r"extends: expected the path of another grid file \(relative to this one\), got \["),
    ({"child.yaml": "extends: other.yaml\nname: child\n",
      "other.yaml": "extends: child.yaml\nname: other\n"}, "extends: a cycle"),
    ({"child.yaml": "extends: child.yaml\nname: child\n"}, "extends: a cycle"),
    ({"child.yaml": "extends: list.yaml\nname: child\n", "list.yaml": "- a\n- b\n"},
     "list.yaml: expected a mapping \\(extended by"),
    ({"child.yaml": "extends: parent.yaml\nname: child\noverrides: {train.lr: 1.0}\n"},
     "overrides.train.lr: set this with the grid's `lrs` field"),
    ({"child.yaml": "extends: parent.yaml\nname: child\nextend: parent.yaml\n"},
     "unknown field 'extend'; allowed: name, .*, extends"),
])
def test_bad_extends_is_one_clear_error_naming_the_file(tmp_path, files, expected):
    write(tmp_path, "parent.yaml", BASE)
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(LabError, match=expected):
        load_grid(tmp_path / "child.yaml")


def test_a_file_without_extends_reads_as_before(tmp_path):
    spec = load_grid(write(tmp_path, "parent.yaml", BASE))
    assert spec.name == "parent" and spec.seeds == (0, 1)
    assert spec.overrides == {"train.val_every": 20, "train.log_every": 5}


# --- reading one file: from_dict's refusals, defaults and nulls (lab/experiments/schema.py) --

GRID_FIELDS = "name, preset, data, tokens, variants, seeds, overrides, lrs, criterion"


@pytest.mark.parametrize("raw, expected", [
    (["name", "g"], f"grid file g.yaml: expected a mapping with fields {GRID_FIELDS}"),
    ("name: g", f"grid file g.yaml: expected a mapping with fields {GRID_FIELDS}"),
    ({"name": "g", "variants": ["baseline"], "seed": [1]},
     f"grid file g.yaml: unknown field 'seed'; allowed: {GRID_FIELDS}"),
    ({"variants": ["baseline"]}, "grid file g.yaml: missing field 'name'"),
    ({"name": "g", "variants": []}, "grid file g.yaml: missing field 'variants'"),
    ({"name": "", "variants": ["baseline"]}, "grid file g.yaml: missing field 'name'"),
    ({"name": "g", "variants": ["baseline"], "preset": 3}, "preset: expected a preset name, got 3"),
    ({"name": "g", "variants": ["baseline"], "data": ""},
     "data: expected synthetic, a corpus directory or text files, got ''"),
    ({"name": "g", "variants": ["baseline"], "lrs": {"from_sweep": 3}},
     "lrs: expected a list of learning rates or {from_sweep: <sweep name>}"),
    ({"name": "g", "variants": ["baseline"], "lrs": {"from_sweep": "lr", "best": 1}},
     "lrs: expected a list of learning rates or {from_sweep: <sweep name>}"),
    ({"name": "g", "variants": ["baseline"], "overrides": {"model.rms_eps": float("nan")}},
     "grid file g.yaml: overrides.model.rms_eps: expected a finite number, got nan"),
])
def test_a_bad_file_is_one_error_naming_the_key(raw, expected):
    with pytest.raises(LabError) as refused:
        grid_from_dict(raw, "grid file g.yaml")
    assert str(refused.value) == expected


def test_a_key_set_to_null_is_absent_and_absent_keys_take_the_defaults():
    spec = grid_from_dict({"name": "g", "variants": ["baseline"], "preset": None, "seeds": None,
                           "tokens": None, "overrides": None, "lrs": None})
    assert spec == GridSpec(name="g", variants=("baseline",))
    assert (spec.preset, spec.data, spec.tokens, spec.seeds, spec.overrides, spec.lrs,
            spec.lr_sweep) == ("tiny", "synthetic", None, (0,), {}, None, None)


def test_learning_rates_come_as_a_list_or_from_a_sweep():
    listed = grid_from_dict({"name": "g", "variants": "all", "lrs": [1e-3, "3e-3"]})
    assert listed.lrs == (1e-3, 3e-3) and listed.lr_sweep is None and listed.variants == "all"
    swept = grid_from_dict({"name": "g", "variants": ["baseline"], "lrs": {"from_sweep": "lr"}})
    assert swept.lrs is None and swept.lr_sweep == "lr"


@pytest.mark.parametrize("value, path", [
    ({"a": [1.0, {"b": float("inf")}]}, "a.1.b"),
    ([0.5, float("-inf")], "1"),
    (float("nan"), "value"),
])
def test_check_finite_numbers_names_the_path_to_a_nan_or_infinity(value, path):
    with pytest.raises(LabError, match=rf"^f.yaml: {path}: expected a finite number, got "):
        check_finite_numbers("f.yaml", value)


def test_finite_numbers_and_other_values_pass():
    check_finite_numbers("f.yaml", {"a": [1, 2.5, {"b": "text", "c": None, "d": True}],
                                    "e": 1e308})


# --- flags over a file: with_flags (both kinds) and the grid's with_cli -------------------

def test_flags_replace_the_files_values_and_set_adds_to_its_overrides():
    spec = grid_from_dict({"name": "g", "variants": ["baseline"], "tokens": 2e5,
                           "seeds": [0, 1], "lrs": {"from_sweep": "lr"},
                           "overrides": {"train.val_every": 50, "train.log_every": 5}})
    flagged = with_cli(spec, preset="small", data="cache/books", tokens="1e4", seeds="2,3",
                       lrs="1e-3,3e-3", variants="baseline,sdpa_headwise_sigmoid_mul",
                       overrides=["train.log_every=7", "model.qk_norm=false"])
    assert (flagged.preset, flagged.data, flagged.tokens) == ("small", "cache/books", 1e4)
    assert flagged.seeds == (2, 3) and flagged.variants == ("baseline",
                                                            "sdpa_headwise_sigmoid_mul")
    assert flagged.lrs == (1e-3, 3e-3) and flagged.lr_sweep is None  # --lrs over from_sweep
    assert flagged.overrides == {"train.val_every": 50, "train.log_every": "7",
                                 "model.qk_norm": "false"}
    assert spec.tokens == 2e5 and spec.overrides["train.log_every"] == 5  # the file's, kept
    assert with_cli(spec) == spec  # no flags: the file as it is


@pytest.mark.parametrize("flags, expected", [
    (dict(preset=""), "--preset: expected a preset name, got ''"),
    (dict(data=""), "--data: expected synthetic, a corpus directory or text files, got ''"),
    (dict(tokens="lots"), "--tokens: "),
    (dict(overrides=["train.seed=3"]), "--set.train.seed: set this with the grid's `seeds` "
                                       "field"),
    (dict(overrides=["train.val_every"]), "--set: expected key=value, got 'train.val_every'"),
    (dict(seeds="x"), "--seeds: "),
    (dict(lrs="0"), "--lrs: "),
    (dict(variants=[3]), "--variants: variant names are strings, got 3"),
    (dict(variants="a,b,a"), "--variants: lists a value twice"),
])
def test_a_bad_flag_is_one_error_naming_the_flag(flags, expected):
    spec = grid_from_dict({"name": "g", "variants": ["baseline"]})
    with pytest.raises(LabError) as refused:
        with_cli(spec, **flags)
    assert str(refused.value).startswith(expected) and "\n" not in str(refused.value)


def test_the_recorded_grid_yaml_reads_back_as_the_grid():
    """to_dict is what the grid's parent run keeps as grid.yaml (records.log_yaml: PyYAML's
    safe dumper); read back, it is the same grid (its lr_sweep null: lrs were listed)."""
    spec = grid_from_dict({"name": "g", "variants": ["baseline", "sdpa_headwise_sigmoid_mul"],
                           "tokens": 1e4, "seeds": [0, 2], "lrs": [1e-3],
                           "overrides": {"train.val_every": 5, "model.qk_norm": False}})
    recorded = yaml.safe_load(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    assert recorded.pop("lr_sweep") is None
    assert recorded["variants"] == ["baseline", "sdpa_headwise_sigmoid_mul"]
    assert grid_from_dict(recorded) == spec
    assert grid_from_dict({"name": "g", "variants": "all"}).to_dict()["variants"] == "all"


def test_an_extends_chain_longer_than_max_extends_is_refused_not_a_recursion_error(tmp_path):
    write(tmp_path, "g0.yaml", BASE)
    for level in range(1, MAX_EXTENDS + 2):
        write(tmp_path, f"g{level}.yaml", f"extends: g{level - 1}.yaml\nname: g{level}\n")
    assert load_grid(tmp_path / f"g{MAX_EXTENDS}.yaml").name == f"g{MAX_EXTENDS}"
    with pytest.raises(LabError, match=rf"extends: a chain of more than {MAX_EXTENDS} files "
                                       rf"\(from .*g{MAX_EXTENDS + 1}.yaml\)"):
        load_grid(tmp_path / f"g{MAX_EXTENDS + 1}.yaml")
