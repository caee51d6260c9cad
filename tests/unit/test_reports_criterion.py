"""lab/reports/criterion.py: a grid file's premise checked against the runs (the numbers
chosen), and the trends it gates made "not testable here" in the report where it fails,
whether the criterion comes from a grid file on the command line or from the parent run's
grid.yaml."""

from __future__ import annotations

import pytest

from lab.experiments.criterion import Criterion, Premise
from lab.reports.criterion import check_premise, gate_verdicts, CriterionResult, PremiseResult
from lab.reports.seeds import Row, RunRecord

FATTN = "sink/first_token_attn"


def rows_with(finals: list[float]) -> list[Row]:
    runs = [RunRecord(f"r{seed}", "baseline", 3e-3, seed, {FATTN: value}, False)
            for seed, value in enumerate(finals)]
    return [Row("baseline", 3e-3, runs, None)]


def history_of(earlier: list[float], finals: list[float]):
    """Each run logged the measure at steps 500, 1000 and 4000 (the last, its final value)."""
    series = {f"r{seed}": [(500, 0.01), (1000, at), (4000, final)]
              for seed, (at, final) in enumerate(zip(earlier, finals))}
    return lambda run_id, metric: series[run_id] if metric == FATTN else []


@pytest.mark.parametrize("finals, earlier, met", [
    ([0.031, 0.035, 0.030], [0.012, 0.014, 0.012], True),     # level and rising in every seed
    ([0.026, 0.0296, 0.027], [0.012, 0.014, 0.012], False),   # sink.yaml's: mean 0.0275 < 0.03
    ([0.040, 0.040, 0.040], [0.012, 0.050, 0.012], False),    # one seed fell from step 1,000
])
def test_a_premise_is_the_mean_level_and_the_rise_in_every_seed(finals, earlier, met):
    premise = Premise("baseline", FATTN, 0.03, 1000)
    result = check_premise(premise, rows_with(finals), history_of(earlier, finals))
    assert result.met is met
    mean = sum(finals) / 3
    assert f"mean {mean:.3g} over 3 seeds" in result.evidence
    rose = sum(f > e for f, e in zip(finals, earlier))
    assert f"in {rose} of 3 seeds: {'yes' if rose == 3 else 'no'}" in result.evidence


def test_a_premise_that_cannot_be_checked_says_why():
    premise = Premise("baseline", FATTN, 0.03, 1000)
    assert check_premise(Premise("sdpa_elementwise_sigmoid_mul", FATTN, 0.03), rows_with([0.1]),
                         history_of([0.0], [0.1])).met is None
    only_final = check_premise(premise, rows_with([0.1, 0.1]), lambda run_id, metric: [(4000, 0.1)])
    assert only_final.met is None and "not logged through training" in only_final.evidence
    unlogged = [Row("baseline", 3e-3, [RunRecord("r0", "baseline", 3e-3, 0, {}, False)], None)]
    assert check_premise(premise, unlogged, history_of([0], [0])).met is None


def ladder(finals_by_lr: dict[float, list[float]], diverged: dict[float, set] | None = None
           ) -> list[Row]:
    """The baseline over an LR ladder: each rung's runs' final validation losses by seed."""
    diverged = diverged or {}
    return [Row("baseline", lr, [RunRecord(f"{lr}-{seed}", "baseline", lr, seed,
                                           {"val/final_loss": final}, seed in diverged.get(lr, ()))
                                 for seed, final in enumerate(finals)], None)
            for lr, finals in finals_by_lr.items()]


BREAKS = Premise("baseline", None, None, None, "every seed")


@pytest.mark.parametrize("finals_by_lr, diverged, met, said", [
    # best rung 3e-3 (mean 3.50); at 1e-1 both seeds end more than 0.05 above it: broke
    ({3e-3: [3.50, 3.50], 1e-2: [3.52, 3.53], 1e-1: [3.60, 3.58]}, {}, True,
     "yes (broke, by LR: 0.003: 0 of 2, 0.01: 0 of 2, 0.1: 2 of 2)"),
    # one seed only at the top rung: a spike or one bad seed is not the ladder breaking
    ({3e-3: [3.50, 3.50], 1e-2: [3.52, 3.53], 1e-1: [3.60, 3.52]}, {}, False,
     "no (broke, by LR: 0.003: 0 of 2, 0.01: 0 of 2, 0.1: 1 of 2)"),
    # a divergence counts as breaking, whatever loss it logged
    ({3e-3: [3.50, 3.50], 1e-1: [3.51, 3.52]}, {1e-1: {0, 1}}, True, "0.1: 2 of 2"),
    # below the best rung a worse loss is under-training, not breaking
    ({1e-3: [3.90, 3.95], 3e-3: [3.50, 3.50]}, {}, False, "0.001: 0 of 2"),
])
def test_a_ladder_premise_asks_every_seed_to_break_at_some_lr(finals_by_lr, diverged, met, said):
    result = check_premise(BREAKS, [], None, ladder(finals_by_lr, diverged), margin=0.05)
    assert result.met is met
    assert result.evidence.startswith("baseline breaks in every seed at some LR (margin 0.05 "
                                      f"nats): {'yes' if met else 'no'} (broke, by LR: ")
    assert said in result.evidence


def test_a_ladder_premise_needs_a_ladder_and_two_seeds_at_the_rung():
    one_lr = check_premise(BREAKS, [], None, ladder({3e-3: [3.5, 3.5]}), margin=0.05)
    assert one_lr.met is None and "no ladder" in one_lr.evidence
    one_seed = check_premise(BREAKS, [], None, ladder({3e-3: [3.5], 1e-1: [9.0]}), margin=0.05)
    assert one_seed.met is False and one_seed.evidence.endswith(
        "(broke, by LR: 0.003: 0 of 1, 0.1: 1 of 1; a rung needs at least 2 seeds, all broken)")


def test_a_criterion_naming_no_trend_of_the_paper_is_refused_by_the_report():
    from lab.errors import LabError
    from lab.reports.criterion import evaluate_criterion

    criterion = Criterion("before", (Premise("baseline", FATTN, 0.03),), ("7", "99"))
    with pytest.raises(LabError, match="report: g.yaml: criterion: trends: '99' is not a trend"):
        evaluate_criterion(criterion, "g.yaml", rows_with([0.1]), client=None)


def test_only_the_named_trends_are_gated_and_only_when_the_premise_fails():
    from lab.reports.trends.definitions import TRENDS
    from lab.reports.trends.verdicts import TrendResult

    verdicts = [TrendResult(t, [], "holds") for t in TRENDS]
    criterion = Criterion("before", (Premise("baseline", FATTN, 0.03),), ("7", "7f"))

    def judged(met):
        return CriterionResult(criterion, "a file", (PremiseResult(criterion.premise[0], met, "x"),))

    assert gate_verdicts(verdicts, judged(True)) == verdicts
    assert gate_verdicts(verdicts, None) == verdicts
    for met, word in ((False, "not met"), (None, "not checkable")):
        gated = {v.trend.number: v.verdict for v in gate_verdicts(verdicts, judged(met))}
        assert gated["7"] == gated["7f"] == (f"not testable here: the grid file's premise is "
                                             f"{word} (report.md, 'The grid file's criterion')")
        assert all(v == "holds" for n, v in gated.items() if n not in ("7", "7f"))


@pytest.mark.slow
def test_the_report_checks_the_criterion_of_the_grid_file_or_of_the_parent_run(store, tmp_path):
    """Sink measures logged through training by the fake grid's baseline; the report, given
    the grid file, says the premise is not met and scores trends 7 and 7f not testable; by
    name it reads the criterion the grid last ran with (the parent's grid.yaml); a grid
    file whose premise holds leaves the verdicts to the comparisons."""
    import yaml
    from mlflow.tracking import MlflowClient
    from test_report import write_grid

    from lab import records
    from lab.reports.compose import report_grids

    parent = write_grid(store)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("fake").experiment_id
    for run in client.search_runs([experiment], "attributes.status = 'FINISHED'"):
        if run.data.tags["variant"] == "baseline":
            for step, value in ((500, 0.010), (1000, 0.012), (4000, 0.026)):
                client.log_metric(run.info.run_id, FATTN, value, step=step)
            client.log_metric(run.info.run_id, "sink/head_share_short", 0.25)
        elif run.data.tags["variant"] == "sdpa_elementwise_sigmoid_mul":
            client.log_metric(run.info.run_id, FATTN, 0.013)
            client.log_metric(run.info.run_id, "sink/head_share_short", 0.09)

    def grid_file(at_least: float):
        path = tmp_path / f"fake-{at_least}.yaml"
        raw = {"name": "fake", "variants": ["baseline"],
               "criterion": {"written": "2026-12-06, before any cell ran",
                             "premise": [{"variant": "baseline", "measure": FATTN,
                                          "at_least": at_least, "rises_from_step": 1000}],
                             "trends": ["7", "7f"]}}
        path.write_text(yaml.safe_dump(raw))
        return path

    printed = report_grids([str(grid_file(0.03))], store, str(tmp_path / "a"))
    assert "the grid file's criterion: premise not met: baseline sink/first_token_attn at the " \
           "last step: mean 0.026 over 3 seeds" in " ".join(printed.split())
    md = (tmp_path / "a" / "report.md").read_text()
    assert "From the grid file " in md and "**premise not met**" in md
    assert "| 7 | the attention sink is removed by G1 only" in md
    assert "not testable here: the grid file's premise is not met" in md

    met = report_grids([str(grid_file(0.02))], store, str(tmp_path / "b"))
    assert "premise met" in met and "premise is not met" not in met
    assert "not testable here: the grid file's premise" not in (tmp_path / "b" / "report.md").read_text()

    assert "criterion" not in report_grids(["fake"], store, str(tmp_path / "c"))  # none recorded
    records.log_yaml(client, parent, yaml.safe_load(grid_file(0.03).read_text()), "grid.yaml")
    by_name = report_grids(["fake"], store, str(tmp_path / "d"))
    assert "premise not met" in by_name
    assert "From the grid.yaml of the grid's parent run" in (tmp_path / "d" / "report.md").read_text()
