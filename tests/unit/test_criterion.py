"""lab/experiments/criterion.py: a grid file's `criterion:` read and checked, and carried by
the grid spec (lab/experiments/schema.py) into the grid.yaml its parent run records."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lab.errors import LabError
from lab.experiments.criterion import Criterion, Premise, read_criterion
from lab.experiments.schema import grid_from_dict

SINK = {"written": "2026-12-05, before any cell ran",
        "premise": [{"variant": "baseline", "measure": "sink/first_token_attn",
                     "at_least": 0.03, "rises_from_step": 1000}],
        "trends": [7, "7f"]}


def test_a_criterion_reads_into_its_premise_trends_and_margin():
    criterion = read_criterion(SINK)
    assert criterion == Criterion("2026-12-05, before any cell ran",
                                  (Premise("baseline", "sink/first_token_attn", 0.03, 1000),),
                                  ("7", "7f"))
    assert read_criterion(criterion.to_dict()) == criterion
    margin_only = read_criterion({"written": "before", "broke_margin": "5e-2"})
    assert margin_only.broke_margin == 0.05 and not margin_only.premise
    # a bare date, which YAML reads as one, is when it was written
    dated = read_criterion(yaml.safe_load("written: 2026-12-06\nbroke_margin: 0.05\n"))
    assert dated.written == "2026-12-06" and read_criterion(dated.to_dict()) == dated


@pytest.mark.parametrize("change, message", [
    ({"written": ""}, "criterion: written: say when"),
    ({"extra": 1}, "criterion: unknown key 'extra'"),
    ({"trends": None}, "criterion: trends: name the trends the premise gates"),
    ({"trends": [True]}, "criterion: trends: expected a list"),
    ({"trends": "7"}, "criterion: trends: expected a list"),
    ({"premise": {"variant": "baseline"}}, "criterion: premise: expected a list"),
    ({"premise": [{"variant": "nosuch", "measure": "a/b", "at_least": 1}]},
     "criterion: premise[0]: variant: 'nosuch' is not a variant"),
    ({"premise": [{"variant": "baseline", "measure": "ppl", "at_least": 1}]},
     "criterion: premise[0]: measure: expected a metric name"),
    ({"premise": [{"variant": "baseline", "measure": "a/b"}]},
     "criterion: premise[0]: missing key 'at_least'"),
    ({"premise": [{"variant": "baseline", "measure": "a/b", "at_least": "high"}]},
     "criterion: premise[0]: at_least: expected a number"),
    ({"premise": [{"variant": "baseline", "measure": "a/b", "at_least": 1,
                   "rises_from_step": 1.5}]}, "rises_from_step: expected a step"),
    ({"broke_margin": 0}, "criterion: broke_margin: must be a positive number"),
    ({"premise": [{"variant": "baseline", "breaks": "often"}]},
     "criterion: premise[0]: breaks: expected one of every seed, got 'often'"),
    ({"premise": [{"variant": "baseline", "breaks": "every seed", "measure": "a/b"}]},
     "criterion: premise[0]: breaks: a premise is a measure or a break, not both"),
    ({"premise": [{"breaks": "every seed"}]}, "criterion: premise[0]: missing key 'variant'"),
])
def test_a_bad_criterion_is_one_error_naming_its_key(change, message):
    with pytest.raises(LabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_criterion({**SINK, **change})


def test_a_grid_file_carries_its_criterion_into_grid_yaml_and_back():
    raw = {"name": "g", "variants": ["baseline"], "criterion": SINK}
    spec = grid_from_dict(raw)
    recorded = yaml.safe_load(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    assert recorded["criterion"]["premise"][0]["at_least"] == 0.03
    assert read_criterion(recorded["criterion"]) == spec.criterion
    # a grid without one records the grid.yaml it always did
    assert "criterion" not in grid_from_dict({"name": "g", "variants": ["baseline"]}).to_dict()
    with pytest.raises(LabError, match="grid file: criterion: unknown key|criterion: unknown key"):
        grid_from_dict({**raw, "criterion": {**SINK, "nope": 1}})



def test_a_premise_names_one_of_the_grids_variants(tmp_path):
    """One the grid does not run could never be checked: refused, also where a grid that
    extends another runs other variants and would inherit the other's premise."""
    with pytest.raises(LabError, match="criterion: premise\\[0\\]: variant: 'baseline' is not "
                       "one of the grid's variants \\(sdpa_elementwise_sigmoid_mul\\)"):
        grid_from_dict({"name": "g", "variants": ["sdpa_elementwise_sigmoid_mul"],
                        "criterion": SINK})
    assert grid_from_dict({"name": "g", "variants": "all", "criterion": SINK}).criterion
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"name": "base", "variants": ["baseline"],
                                                        "criterion": SINK}))
    (tmp_path / "gated.yaml").write_text("extends: base.yaml\nname: gated\n"
                                         "variants: [sdpa_elementwise_sigmoid_mul]\n")
    from lab.experiments.schema import load_grid

    with pytest.raises(LabError, match="is not one of the grid's variants"):
        load_grid(tmp_path / "gated.yaml")
    (tmp_path / "gated.yaml").write_text((tmp_path / "gated.yaml").read_text() + "criterion: null\n")
    assert load_grid(tmp_path / "gated.yaml").criterion is None


def test_the_committed_sink_grids_name_their_premise():
    from lab.experiments.schema import load_grid

    ablations = Path(__file__).resolve().parents[2] / "ablations"
    for name in ("sink", "sink-long"):
        criterion = load_grid(ablations / f"{name}.yaml").criterion
        assert criterion.premise == (Premise("baseline", "sink/first_token_attn", 0.03, 1000),)
        assert criterion.trends == ("7", "7f")
    for name in ("stability", "stability-noqk"):
        criterion = load_grid(ablations / f"{name}.yaml").criterion
        assert criterion.broke_margin == 0.05 and criterion.trends == ("11",)
        assert criterion.premise == (Premise("baseline", None, None, None, "every seed"),)
        assert read_criterion(criterion.to_dict()) == criterion
