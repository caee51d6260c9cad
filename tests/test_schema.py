"""lab/experiments/schema.py: a file that `extends` another (the control grids of ablations/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.errors import LabError
from lab.experiments.schema import load_grid
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
