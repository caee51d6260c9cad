"""lab/training/phases.py: a run's wall clock split into phases, logged as `time/<phase>_s`
and summed by the grid into one line."""

import time

import pytest
from mlflow.tracking import MlflowClient

from gridkit import tiny_grid
from lab.config import resolve
from lab.experiments.grid.run import GridOptions, describe_summary, run_grid
from lab.experiments.schema import grid_from_dict
from lab.training import phases
from lab.training.phases import PHASES, TOTAL_METRIC, PhaseClock, breakdown, metric
from lab.training.run import train_run


def test_the_phases_and_other_add_up_to_the_total():
    clock = PhaseClock({"startup": 2.0, "check_share": 1.0})
    with clock.phase("validation"):
        time.sleep(0.05)
    m = clock.metrics()
    assert m[metric("startup")] == 2.0 and m[metric("check_share")] == 1.0
    assert m[metric("validation")] >= 0.05
    assert sum(m[metric(name)] for name in PHASES) == pytest.approx(m[TOTAL_METRIC])
    # The total is the phases measured before plus this clock's own time ...
    assert 3.05 <= m[TOTAL_METRIC] < 3.5
    # ... unless phases overlap (more than the clock's time): the total then exceeds it.
    clock.add("train_steps", 5.0)
    assert clock.metrics()[TOTAL_METRIC] > 8.0
    with pytest.raises(KeyError, match="unknown phase 'compiling'"):
        clock.add("compiling", 1.0)


def test_startup_is_paid_once_per_process(monkeypatch):
    monkeypatch.setattr(phases, "_startup_taken", False)
    monkeypatch.setattr(phases, "_process_started_at", lambda: time.time() - 7.0)
    assert phases.startup_seconds() == pytest.approx(7.0, abs=0.5)
    assert phases.startup_seconds() == 0.0


def test_the_breakdown_line_gives_shares_largest_first():
    line = breakdown({"train_steps": 90.0, "compile": 6.0, "validation": 3.0, "store": 0.4,
                      "other": 0.6}, 2)
    assert line == ("time in 2 cell(s), 100 s summed: train steps 90% (90 s), compile 6% (6 s), "
                    "validation 3% (3 s), other 1% (1 s)")
    assert "no phases" in breakdown({}, 1)


# A run that has every phase: periodic analysis and checkpoints inside training, the
# end-of-run analysis after it.
EVERY_PHASE = {"model.context": 32, "train.batch_size": 8, "train.val_every": 4,
               "train.val_batches": 2, "train.log_every": 2, "train.analysis_windows": 2,
               "train.long_context_factors": "1,2", "train.analysis_every": 8,
               "train.checkpoint_every": 8}


@pytest.mark.slow
def test_a_run_logs_every_phase_and_they_sum_to_its_wall_clock(store):
    config = resolve("baseline", "tiny", EVERY_PHASE, data="synthetic", tokens=16 * 256)
    started = time.perf_counter()
    result = train_run(config, store, "phases", quiet=True, phases={"check_share": 0.25})
    wall = time.perf_counter() - started
    logged = MlflowClient(store).get_run(result.run_id).data.metrics
    m = result.metrics
    for name in PHASES:
        assert metric(name) in logged, name
    for name in ("data_open", "store", "model_build", "train_steps", "validation",
                 "periodic_analysis", "checkpoint", "final_eval", "analysis"):
        assert logged[metric(name)] > 0, name
    assert logged[metric("compile")] == 0  # eager on the CPU
    # model_build's parts: each logged, and together the phase
    parts = [logged[phases.model_build_metric(part)] for part in phases.MODEL_BUILD_PARTS]
    assert all(seconds >= 0 for seconds in parts) and parts[0] > 0 and parts[2] > 0
    assert sum(parts) == pytest.approx(logged[metric("model_build")], abs=1e-6)
    assert logged[metric("check_share")] == 0.25
    # Logged: the phases add up to the logged total; returned: also the closing of the run.
    assert sum(logged[metric(n)] for n in PHASES) == pytest.approx(logged[TOTAL_METRIC])
    assert sum(m[metric(n)] for n in PHASES) == pytest.approx(m[TOTAL_METRIC], abs=1e-6)
    # The total is the call's wall clock (with the share of the check and this process's
    # startup, if this was its first run), and what no phase claims is a small part of it.
    before = 0.25 + m[metric("startup")]
    assert m[TOTAL_METRIC] - before == pytest.approx(wall, rel=0.02, abs=0.05)
    assert m[metric("other")] < 0.25 * (m[TOTAL_METRIC] - before)


@pytest.mark.slow
def test_the_grid_prints_the_summed_breakdown_of_its_cells(store, capsys):
    spec = grid_from_dict(tiny_grid("timed", ["baseline"], seeds=(0, 1)))
    summary = run_grid(spec, GridOptions(quiet=True))
    assert len(summary.outcomes) == 2 and all(o.phases for o in summary.outcomes)
    for outcome in summary.outcomes:
        # The cell's claim and run creation count as store time before its run started.
        assert outcome.phases["store"] > 0 and outcome.phases["train_steps"] > 0
        assert sum(outcome.phases.values()) <= outcome.wall_s + 0.05 + outcome.phases["startup"]
    text = describe_summary(summary)
    line = text.splitlines()[-1]
    total = sum(sum(o.phases.values()) for o in summary.outcomes)
    assert line.startswith(f"  time in 2 cell(s), {total:,.0f} s summed: ")
    assert "train steps" in line and "s check" in line and "wall" in line
