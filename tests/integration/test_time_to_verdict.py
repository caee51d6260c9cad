"""benchmarks/time_to_verdict.py, the parts a CPU can run: its arguments, the budget, the
tables, and a dry pass (tiny preset) through a real grid and the timed loops."""

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from lab.training.phases import PHASES

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "time_to_verdict.py"
# the last real call's JSON before grid-small trained 4 variants: 4 seeds of baseline
ROUND_3 = REPO / "benchmarks" / "results" / "2026-12-06-h100-ttv-round3.json"
_spec = importlib.util.spec_from_file_location("time_to_verdict", SCRIPT)
ttv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ttv)


@pytest.mark.parametrize("argv, message", [
    (["out", "--sections", "grid-small,warp-drive"], "--sections: unknown warp-drive"),
    (["out", "--sections", ","], "--sections: unknown (none given)"),
    (["out", "--budget-s", "0"], "--budget-s: must be positive"),
])
def test_bad_arguments_stop_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        ttv.parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_default_is_every_section_in_priority_order_within_one_call():
    args = ttv.parse_args(["out"])
    assert args.sections == ["grid-small", "deep-narrow", "mfu", "liger", "grid-base",
                             "grid-small-again", "grid-small-warm", "deep-narrow-modes",
                             "seed-batch-bound"]
    assert args.budget_s <= 540 and not args.dry
    # the acceptance's table (the grid's cells, deep-narrow against its bare loop, MFU) in
    # the default budget, by the estimates (measured: the fourth round's 252 + 83 + 121 s)
    assert sum(ttv.ESTIMATED_S[name] for name in args.sections[:3]) <= args.budget_s


@pytest.mark.slow
def test_sections_past_the_budget_are_skipped_and_said(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(ttv, "SECTION_RUNS", {name: (lambda ctx, n=name: ran.append(n) or {})
                                              for name in ttv.SECTIONS})
    # The clock at the start, at mfu's budget check and start, then 6 s later for good.
    ticks = itertools.chain([0.0, 0.0, 0.0], itertools.repeat(6.0))
    args = ttv.parse_args([str(tmp_path / "out"), "--dry", "--budget-s", "9",
                           "--sections", "mfu,liger,grid-base"])
    report = ttv.run(args, clock=lambda: next(ticks))
    assert ran == ["mfu"]  # 5 s estimated a section in --dry: after mfu's 6 s, 3 s are left
    sections = report["sections"]
    assert sections["mfu"] == {"status": "done", "seconds": 6.0}
    assert sections["liger"] == {"status": "skipped",
                                 "reason": "estimated 5 s, 3 s of the budget left"}
    written = json.loads((tmp_path / "out" / "time_to_verdict.json").read_text())
    assert written["sections"]["grid-base"]["status"] == "skipped"
    md = (tmp_path / "out" / "time_to_verdict.md").read_text()
    assert "- liger: skipped: estimated 5 s, 3 s of the budget left" in md


def test_a_failing_section_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ttv, "SECTION_RUNS", {**ttv.SECTION_RUNS, "mfu": broken,
                                              "liger": lambda ctx: {"rows": []}})
    args = ttv.parse_args([str(tmp_path), "--dry", "--sections", "mfu,liger"])
    report = ttv.run(args)
    assert report["sections"]["mfu"]["status"] == "failed"
    assert report["sections"]["mfu"]["reason"] == "RuntimeError: out of memory"
    assert report["sections"]["liger"]["status"] == "done"
    assert ttv.main([str(tmp_path), "--dry", "--sections", "mfu"]) == 1


def test_the_tables_show_each_cells_phases_and_each_loops_ratio():
    cell = {"cell": "baseline/lr=0.003/seed=0", "runs_per_gpu": 2, "total_s": 100.0,
            "train_steps": 91.0, "train_fraction": 0.91, "compile": 3.0, "check_share": 1.0,
            "startup": 0.5, "validation": 1.5, "final_eval": 0.5, "analysis": 1.0,
            "periodic_analysis": 0.0, "checkpoint": 0.5, "store": 0.5, "other": 0.2,
            "data_open": 0.1, "model_build": 0.2, "tokens_per_s": 1_000_000.0, "mfu": 0.2}
    report = {"environment": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
              "date": "2026-12-06", "dry": False, "budget_s": 540, "seconds": 500,
              "sections": {
                  "grid-small": {"status": "done", "grid": "ttv-small", "cells": [cell],
                                 "settings": "reproduce.yaml", "grid_s": 120.0, "report_s": 6.0,
                                 "time_line": "time in 1 cell"},
                  "deep-narrow": {"status": "done", "rows": [
                      {"preset": "deep-narrow", "mode": "reduce-overhead", "batch_size": 16,
                       "lab_over_bare": 0.85,
                       "bare": {"tokens_per_s": 500_000.0, "mfu": 0.1},
                       "lab": {"tokens_per_s": 425_000.0, "mfu": 0.085}}]},
                  "liger": {"status": "skipped", "reason": "no liger_kernel"}}}
    md = ttv.tables(report)
    assert ("| ttv-small | baseline/lr=0.003/seed=0 | first | 2 | 100.0 | 91.0 | **0.910** | "
            "3.0 | 1.0 | 0.5 | 2.0 | 1.0 | 0.5 | 0.5 | 0.5 | 1,000,000 |") in md
    # 120 s measured, then 47 more cells, 2 at a time, at 100 - 1 - 0.5 s each, then 6 s
    assert ("projected 48-cell `small` grid on this GPU, start to report: 40.7 min, an upper "
            "bound") in md
    assert ("| deep-narrow | deep-narrow | reduce-overhead, batch 16 | 500,000 (10.0%) | 425,000 (8.5%) "
            "| 0.850 |") in md
    assert "- liger: skipped: no liger_kernel" in md


def test_the_projection_counts_the_check_and_start_up_once_not_in_every_cell():
    """The H100 call of 2026-12-06: 2 packed cells of 146 s, of which 23.4 s the check's share
    and 16.5 s the worker's start-up, in a 197 s grid; the 46 later cells pay neither."""
    cells = [{"runs_per_gpu": 2, "total_s": 145.956, "check_share": 23.364, "startup": 16.556},
             {"runs_per_gpu": 2, "total_s": 145.820, "check_share": 23.364, "startup": 16.509}]
    section = {"settings": "reproduce.yaml", "grid_s": 197.41, "report_s": 13.17, "cells": cells}
    minutes, basis = ttv.projected_small_grid_min(section)
    assert minutes == pytest.approx((197.41 + 46 * 106.0 / 2 + 13.17) / 60, rel=1e-3)
    assert basis == "an upper bound"
    assert ttv.projected_small_grid_min({**section, "settings": "reproduce-base.yaml"}) is None


def test_the_projection_takes_a_workers_later_cells_where_the_section_has_them():
    """4 cells, 2 a GPU: each worker's second cell (no start-up of its own) is what the other
    44 cells of the long grid cost, its share of the check aside; the tables say so."""
    first = {"runs_per_gpu": 2, "total_s": 142.0, "check_share": 8.0, "startup": 16.0,
             "train_fraction": 0.54}
    later = {"runs_per_gpu": 2, "total_s": 88.0, "check_share": 8.0, "startup": 0.0,
             "train_fraction": 0.87}
    section = {"settings": "reproduce.yaml", "grid_s": 250.0, "report_s": 13.0,
               "cells": [first, first, later, later]}
    minutes, basis = ttv.projected_small_grid_min(section)
    assert minutes == pytest.approx((250.0 + 44 * 80.0 / 2 + 13.0) / 60)
    assert basis == "from the 2 cell(s) a worker ran after its first"
    # with the first cells' compile known: in the grid the 2 workers' first cells are 2
    # variants', and each of the other 14 pays it once
    compiled = {**section, "cells": [{**first, "compile": 15.0}, {**first, "compile": 16.0},
                                     {**later, "compile": 0.0}, {**later, "compile": 0.0}]}
    minutes_compiled, basis = ttv.projected_small_grid_min(compiled)
    assert minutes_compiled == pytest.approx((250.0 + (44 * 80.0 + 14 * 15.5) / 2 + 13.0) / 60)
    assert basis == ("from the 2 cell(s) a worker ran after its first, and each of the other "
                     "14 variants' compile once (16 s; their check not counted)")
    cells = [{**c, "cell": f"baseline/lr=0.003/seed={i}", "train_steps": 1.0, "compile": 0.0,
              "validation": 0.0, "final_eval": 0.0, "analysis": 0.0, "periodic_analysis": 0.0,
              "checkpoint": 0.0, "store": 0.0, "other": 0.0, "data_open": 0.0,
              "model_build": 0.0, "tokens_per_s": 1e6} for i, c in enumerate(section["cells"])]
    report = {"environment": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
              "date": "2026-12-06", "dry": False, "budget_s": 540, "seconds": 500,
              "sections": {"grid-small": {**section, "cells": cells, "status": "done",
                                          "grid": "ttv-small"}}}
    md = ttv.tables(report)
    assert f"start to report: {minutes:.1f} min, from the 2 cell(s) a worker ran" in md
    assert "the cells a worker ran after its first: 0.870 of their wall clock" in md
    # 1 s of steps in the 80 s left once the 8-s check share is taken out
    assert "(mean of 2); 0.013 without their share of this grid's check" in md
    assert "summed cell time in training steps" not in md  # no `loaded` cell to estimate it


@pytest.mark.parametrize("startup, compile_s, kind", [
    (16.0, 15.0, "first"),   # a worker's first cell: its start-up paid, compiled cold
    (12.0, 3.5, "first"),    # ...or loaded: still the worker's first
    (0.0, 3.5, "loaded"),    # a later cell that compiled: its graphs from the cache
    (0.0, 14.2, "cold"),     # ...or compiled cold, as a first cell: not a `loaded` one
    (0.0, 0.0023, "kept"),   # round 3's kept cell: a first step's jitter, no compile
    (0.0, 0.0, "kept"),
])
def test_each_cell_says_which_kind_it_is(startup, compile_s, kind):
    assert ttv.cell_kind({"startup": startup, "compile": compile_s}) == kind


def _section_of_four_variants() -> dict:
    """grid-small since the compile-ahead: 4 variants at seed 0, 2 a GPU: the first two each
    a worker's first, compiling cold; the other two later cells, their graphs loaded."""
    phases = {"validation": 0.0, "final_eval": 0.0, "analysis": 0.0, "periodic_analysis": 0.0,
              "checkpoint": 0.0, "store": 0.0, "other": 0.0, "data_open": 0.0,
              "model_build": 0.0, "tokens_per_s": 1e6, "runs_per_gpu": 2, "check_share": 20.0}
    first = dict(phases, total_s=140.0, train_steps=77.0, compile=15.0, startup=14.0)
    loaded = dict(phases, total_s=104.0, train_steps=77.0, compile=4.0, startup=0.0)
    cells = [dict(first, cell="baseline/lr=0.003/seed=0"),
             dict(first, cell="sdpa_elementwise_sigmoid_mul/lr=0.003/seed=0"),
             dict(loaded, cell="sdpa_headwise_sigmoid_mul/lr=0.003/seed=0"),
             dict(loaded, cell="value_elementwise_sigmoid_mul/lr=0.003/seed=0")]
    for c in cells:
        c["train_fraction"] = c["train_steps"] / c["total_s"]
    return {"status": "done", "grid": "ttv-small", "settings": "reproduce.yaml",
            "grid_s": 300.0, "report_s": 10.0, "cells": cells,
            "ahead_lines": ["grid ttv-small: compiled sdpa_headwise_sigmoid_mul ahead (17.1 s)",
                            "grid ttv-small: compiled value_elementwise_sigmoid_mul ahead "
                            "(16.4 s)"]}


def test_the_projection_takes_the_loaded_cells_for_the_other_variants_and_seeds():
    """The 48-cell grid: the section's 300 s, then 44 cells 2 at a time (12 other variants'
    first cells at the loaded cells' 84 s, check share aside; 32 other seeds' cells at that
    less their 4-s compile), then the 10-s report."""
    section = _section_of_four_variants()
    minutes, basis = ttv.projected_small_grid_min(section)
    assert minutes == pytest.approx((300.0 + (12 * 84.0 + 32 * 80.0) / 2 + 10.0) / 60)
    assert basis == ("from the 2 `loaded` cell(s): the other 12 variants' first cells at their "
                     "84.0 s (check share aside), the 32 other seeds' cells at that less their "
                     "4.0-s compile (a worker keeps a variant's graphs)")


def test_the_tables_give_the_grids_share_in_steps_and_what_was_compiled_ahead():
    section = _section_of_four_variants()
    report = {"environment": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
              "date": "2026-12-06", "dry": False, "budget_s": 540, "seconds": 500,
              "sections": {"grid-small": section}}
    md = ttv.tables(report)
    assert "| ttv-small | sdpa_elementwise_sigmoid_mul/lr=0.003/seed=0 | first | 2 |" in md
    assert "| ttv-small | value_elementwise_sigmoid_mul/lr=0.003/seed=0 | loaded | 2 |" in md
    # 48 cells of 77 s of steps in 2 x 120 (first, check aside) + 14 x 84 + 32 x 80 s
    share = 48 * 77.0 / (2 * 120.0 + 14 * 84.0 + 32 * 80.0)
    assert (f"the 48-cell grid's summed cell time in training steps, without the check: "
            f"{share:.3f} (2 first cells as measured, 14 `loaded` and 32 `kept`; estimated "
            f"from this call's cells)") in md
    assert "  - `grid ttv-small: compiled value_elementwise_sigmoid_mul ahead (16.4 s)`" in md


def test_round_3s_json_still_projects_its_35_1_minutes(tmp_path, capsys):
    """Round 3 (4 seeds of one variant, one H100): 2 first cells and 2 kept, no loaded one:
    the projection of its own day, and no estimated share."""
    report = json.loads(ROUND_3.read_text())
    section = report["sections"]["grid-small"]
    assert [ttv.cell_kind(c) for c in section["cells"]] == ["first", "first", "kept", "kept"]
    minutes, basis = ttv.projected_small_grid_min(section)
    assert f"{minutes:.1f}" == "35.1"
    assert basis.startswith("from the 2 cell(s) a worker ran after its first, and each of the "
                            "other 14 variants' compile once")
    (tmp_path / "time_to_verdict.json").write_text(ROUND_3.read_text())
    assert ttv.main([str(tmp_path), "--tables-only"]) == 0
    md = (tmp_path / "time_to_verdict.md").read_text()
    assert "start to report: 35.1 min, from the 2 cell(s) a worker ran after its first" in md
    assert "summed cell time in training steps" not in md


def test_tables_only_rewrites_the_tables_from_a_calls_json(tmp_path, capsys):
    assert ttv.main([str(tmp_path), "--tables-only"]) == 2
    assert "no " in capsys.readouterr().err
    report = {"environment": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
              "date": "2026-12-06", "dry": False, "budget_s": 540, "seconds": 500,
              "sections": {"liger": {"status": "skipped", "reason": "no liger_kernel"}}}
    (tmp_path / "time_to_verdict.json").write_text(json.dumps(report))
    assert ttv.main([str(tmp_path), "--tables-only"]) == 0
    assert "- liger: skipped: no liger_kernel" in (tmp_path / "time_to_verdict.md").read_text()


@pytest.mark.slow
def test_a_dry_pass_runs_a_real_grid_and_the_timed_loops(store, tmp_path):
    out, work = tmp_path / "ttv", tmp_path / "work"
    report = ttv.run(ttv.parse_args([str(out), "--work-dir", str(work), "--dry", "--sections",
                                     "grid-small,mfu,liger"]))
    sections = report["sections"]
    grid = sections["grid-small"]
    assert grid["status"] == "done", grid
    (cell,) = grid["cells"]  # --dry: the first of grid-small's 4 variants, at one seed
    # trained in the grid's own process (no pool on the CPU), which counts the start-up as
    # its own: by its phases a later cell, and eager, so one that compiled nothing
    assert cell["cell"] == "baseline/lr=0.003/seed=0" and cell["kind"] == "kept"
    assert grid["ahead_lines"] == []  # nothing compiles on the CPU: no compile-ahead
    assert 0 < cell["train_fraction"] < 1 and cell["train_steps"] > 0
    assert sum(cell[p] for p in PHASES) == pytest.approx(cell["total_s"])
    assert grid["report_exit"] == 0 and (work / "report-ttv-small" / "report.md").exists()
    # what a device call must bring back is alone in OUT_DIR: the JSON, the tables, the logs
    assert sorted(p.name for p in out.iterdir()) == ["grid-ttv-small.log",
                                                     "time_to_verdict.json",
                                                     "time_to_verdict.md"]
    assert grid["time_line"].startswith("time in 1 cell(s)")
    assert sum(cell["model_build_parts"].values()) == pytest.approx(cell["model_build"])
    for row in sections["mfu"]["rows"]:
        assert row["bare"]["tokens_per_s"] > 0 and row["lab"]["tokens_per_s"] > 0
        assert "sorted by self_cpu_time_total" in row["profile"]  # kept in the JSON...
    assert not list(work.glob("profile-*.txt"))  # ...and not as files a call must bring back
    assert sections["liger"]["status"] == "skipped"  # needs CUDA
    md = (out / "time_to_verdict.md").read_text()
    assert "| ttv-small | baseline/lr=0.003/seed=0 |" in md and "| mfu | base | defaults |" in md
    assert "model build, mean of its parts over the cells: construct " in md


def test_the_seed_batch_bound_times_one_model_at_one_two_and_three_batches(tmp_path):
    """A dry pass (tiny, batch 4 a seed): three bare loops in one process and two stacked
    models, each row's rate over the one-seed row's."""
    args = ttv.parse_args([str(tmp_path), "--dry", "--sections", "seed-batch-bound"])
    rows = ttv.run(args)["sections"]["seed-batch-bound"]["rows"]
    assert [r["batch_size"] for r in rows] == [4, 8, 12, 4, 4]
    assert [r["mode"] for r in rows[3:]] == ["2 seeds stacked (torch.func)",
                                            "3 seeds stacked (torch.func)"]
    assert all(r["bare"]["tokens_per_s"] > 0 and r["over_one_seed"] > 0 for r in rows)
    md = (tmp_path / "time_to_verdict.md").read_text()
    assert "| seed-batch-bound | tiny | 3 seed(s) as one batch, batch 12 |" in md
    assert "| seed-batch-bound | tiny | 3 seeds stacked (torch.func), batch 4 |" in md


def test_only_grid_small_is_projected_to_the_48_cell_grid():
    """grid-small-again skips the check and loads its compile: no upper bound to project."""
    cell = {"cell": "baseline/lr=0.003/seed=2", "runs_per_gpu": 1, "total_s": 60.0,
            "train_steps": 55.0, "train_fraction": 0.917, "compile": 1.0, "check_share": 0.0,
            "startup": 2.0, "validation": 1.0, "final_eval": 0.5, "analysis": 0.5,
            "periodic_analysis": 0.0, "checkpoint": 0.0, "store": 0.0, "other": 0.0,
            "data_open": 0.0, "model_build": 0.0, "tokens_per_s": 1e6}
    again = {"status": "done", "grid": "ttv-small-again", "cells": [cell],
             "settings": "reproduce.yaml", "grid_s": 70.0, "report_s": 6.0}
    report = {"environment": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
              "date": "2026-12-06", "dry": False, "budget_s": 540, "seconds": 500,
              "sections": {"grid-small-again": again}}
    md = ttv.tables(report)
    assert "- ttv-small-again: `gatelab grid` 70 s, `gatelab report` 6 s." in md
    assert "projected" not in md
    assert ttv.projected_small_grid_min(again) is not None  # the section alone still projects


def test_packing_is_read_where_one_call_measured_both_sides():
    cells = [{"runs_per_gpu": 2, "tokens_per_s": 980_000.0},
             {"runs_per_gpu": 2, "tokens_per_s": 960_000.0}]
    sections = {"grid-small": {"status": "done", "cells": cells},
                "seed-batch-bound": {"status": "done",
                                     "rows": [{"bare": {"tokens_per_s": 2_000_000.0}}]}}
    assert ttv.packing_line(sections) == ("Packing on this GPU: 2 `small` cells 1,940,000 "
                                          "tokens/s together, the bare loop alone 2,000,000: "
                                          "0.97x.")
    assert ttv.packing_line({**sections, "seed-batch-bound": {"status": "skipped"}}) is None
