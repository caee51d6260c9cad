"""lab/reports/ladder.py: the LR ladder's per-rung series and plot."""

import math

from lab.reports.ladder import ladder_series, plot_ladder, probe_panels
from lab.reports.seeds import Row, RunRecord


def _row(variant, lr, seeds, diverged=()):
    runs = [RunRecord(f"{variant}-{lr}-{s}", variant, lr, s, {}, s in diverged) for s in seeds]
    return Row(variant, lr, runs, None)


def _history(run_id):
    variant, lr, seed = run_id.rsplit("-", 2)
    if variant == "old":  # a run from before loss_history.json
        return None
    steps = list(range(0, 100, 10))
    loss = [5.0 - 0.01 * s for s in steps]
    if float(lr) > 0.05 and variant == "baseline":
        loss[5] = math.nan  # diverged at step 50: its spike peak there must be dropped
    probes = {}
    if variant == "g1":  # logged the probes every 40 steps; the last logit is NaN
        probes = {"attn/logit_max": [(40, 12.0), (80, math.nan)],
                  "act/max_mean": [(40, 30.0), (80, 25.0)]}
    return {"step": steps, "loss": loss, "grad_norm": [1.0 + s for s in steps],
            "spike_steps": [30, 50, 55], "probes": probes}  # 55 was never logged


def test_series_group_runs_by_rung_and_keep_only_spikes_on_finite_logged_steps():
    rows = [_row("baseline", 0.1, [0, 1], diverged=(1,)), _row("g1", 0.1, [0, 1]),
            _row("baseline", 0.01, [0, 1]), _row("old", 0.01, [0])]
    rungs = ladder_series(rows, _history)
    assert list(rungs) == [0.01, 0.1]  # sorted by LR
    assert [(e["variant"], e["seed"]) for e in rungs[0.01]] == [("baseline", 0), ("baseline", 1)]
    top = {(e["variant"], e["seed"]): e for e in rungs[0.1]}
    assert top[("baseline", 0)]["spikes"] == [30]           # 50 is NaN, 55 not logged
    assert top[("g1", 0)]["spikes"] == [30, 50]
    assert top[("baseline", 1)]["diverged"] and not top[("g1", 1)]["diverged"]


def test_plot_writes_one_column_per_rung_and_nothing_without_histories(tmp_path):
    rows = [_row("baseline", 0.1, [0]), _row("g1", 0.01, [0])]
    path = tmp_path / "ladder.png"
    assert plot_ladder(rows, _history, path, {"baseline": "#1f77b4", "g1": "#ff7f0e"})
    assert path.stat().st_size > 10_000
    empty = tmp_path / "none.png"
    assert not plot_ladder([_row("old", 0.1, [0])], _history, empty, {})
    assert not empty.exists()


def test_the_probes_logged_through_training_get_their_own_panels():
    rows = [_row("baseline", 0.1, [0]), _row("g1", 0.1, [0])]
    rungs = ladder_series(rows, _history)
    g1 = next(e for e in rungs[0.1] if e["variant"] == "g1")
    assert g1["probes"] == {"attn/logit_max": [(40, 12.0)],  # the NaN left out
                            "act/max_mean": [(40, 30.0), (80, 25.0)]}
    assert probe_panels(rungs) == ["attn/logit_max", "act/max_mean"]
    assert probe_panels(ladder_series([_row("baseline", 0.1, [0])], _history)) == []
