"""lab/progress.py: the three output levels, what each silences, and the progress lines of a
grid and of a run. tests/integration/test_cli_terminal.py checks whole commands in a fresh process; here
the pieces, with the clock and the trainer stood in for."""

import logging
import os
import re
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from lab.progress import (LIBRARY_LOGGERS, VERBOSITY_ENV, GridProgress,
                          configure_output, duration, set_verbosity, verbosity)
from lab.training.run_progress import RunProgress


@pytest.fixture
def level(monkeypatch):
    """Set the output level for one test; the environment and the libraries' logger levels
    are put back afterwards (set_verbosity writes both)."""
    monkeypatch.setenv(VERBOSITY_ENV, "normal")  # recorded, so the test's change is undone
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "unset-by-test")
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL")
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    with warnings.catch_warnings():  # configure_output adds warning filters: keep them here
        yield lambda name: monkeypatch.setenv(VERBOSITY_ENV, name)
    for name, value in saved.items():
        logging.getLogger(name).setLevel(value)


# --- durations --------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [(0, "0s"), (-5, "0s"), (59.4, "59s"), (59.6, "1m00s"),
                                           (61, "1m01s"), (3599, "59m59s"), (3600, "1h00m"),
                                           (3661, "1h01m"), (2 * 86400 + 90, "48h01m")])
def test_durations_read_as_seconds_minutes_or_hours(seconds, text):
    assert duration(seconds) == text


# --- levels -----------------------------------------------------------------------------

def test_the_level_comes_from_the_environment_and_defaults_to_normal(level):
    assert verbosity() == "normal"
    for name in ("quiet", "verbose"):
        level(name)
        assert verbosity() == name
    level("loud")  # an unknown level, e.g. from an older or newer lab
    assert verbosity() == "normal"


def test_set_verbosity_reaches_worker_processes_through_the_environment(level):
    set_verbosity("quiet")
    assert os.environ[VERBOSITY_ENV] == "quiet"


def test_normal_output_silences_the_libraries_loggers_and_mlflows_level(level):
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    set_verbosity("normal")
    assert all(logging.getLogger(name).level == logging.WARNING for name in LIBRARY_LOGGERS)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"


def test_verbose_output_leaves_the_libraries_as_they_are(level):
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    set_verbosity("verbose")
    assert all(logging.getLogger(name).level == logging.INFO for name in LIBRARY_LOGGERS)
    assert "MLFLOW_LOGGING_LEVEL" not in os.environ


def test_normal_output_sets_optunas_level_once_optuna_is_loaded(level):
    """Through its logger or its own setter: either keeps Optuna's trial log off."""
    optuna = pytest.importorskip("optuna")
    before = optuna.logging.get_verbosity()
    try:
        optuna.logging.set_verbosity(logging.INFO)
        assert "optuna" in sys.modules
        configure_output()
        assert optuna.logging.get_verbosity() == logging.WARNING
    finally:
        optuna.logging.set_verbosity(before)


def raised(level, name: str, emit) -> list[str]:
    """The warnings `emit` raises that reach the user after configure_output at level `name`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        level(name)
        configure_output()
        emit()
    return [str(w.message) for w in caught]


def test_warnings_about_library_internals_are_hidden_but_others_are_not(level):
    def emit():
        warnings.warn("The 'train_dataloader' does not have many workers which may be a "
                      "bottleneck.", UserWarning)
        warnings.warn_explicit("old API", DeprecationWarning, "trainer.py", 1,
                               module="lightning.pytorch.trainer")
        warnings.warn_explicit("old lab API", DeprecationWarning, "config.py", 1,
                               module="lab.config")
        warnings.warn("the lab's own advice", UserWarning)

    assert raised(level, "normal", emit) == ["old lab API", "the lab's own advice"]
    assert len(raised(level, "verbose", emit)) == 4


# --- a grid's lines ---------------------------------------------------------------------

def grid_started(seconds_ago: float, **kwargs) -> GridProgress:
    grid = GridProgress(**{"name": "g", "total": 10, "already_done": 2, "workers": 4,
                           "quiet": False, **kwargs})
    grid.started = time.time() - seconds_ago
    return grid


def test_grid_eta_is_the_mean_cell_time_spread_over_the_workers():
    grid = grid_started(100)
    assert grid.eta() == "?"  # nothing finished: nothing to go by
    grid.done = 2  # 50 s a cell, 8 cells left over 4 workers: 2 rounds
    assert grid.eta() == "1m40s"
    grid.done = 9  # 1 cell left: one worker, one cell's time
    assert grid.eta() == "11s"
    grid.done = 10
    assert grid.eta() == "0s"
    assert GridProgress("g", 4, 0, 0, False).workers == 1  # no worker count: one


def test_grid_cell_lines_count_the_cells_done_before_and_the_failures(capsys):
    grid = grid_started(100, already_done=95)  # 105 cells in all: counts three digits wide
    grid.cell_done("baseline/lr=0.003/seed=0", "FINISHED val/ppl 17.1", failed=False)
    grid.cell_done("g1/lr=0.003/seed=0", "FAILED (oom)", failed=True)
    first, second = capsys.readouterr().out.splitlines()
    # 100 s for 1 cell, 9 left over 4 workers: 225 s; then 50 s a cell, 8 left: 100 s.
    assert first == ("  [ 96/105] baseline/lr=0.003/seed=0: FINISHED val/ppl 17.1  "
                     "(1m40s elapsed, ETA 3m45s)")
    assert second == ("  [ 97/105] g1/lr=0.003/seed=0: FAILED (oom)  "
                      "(1m40s elapsed, 1 failed, ETA 1m40s)")
    assert (grid.done, grid.failed) == (2, 1)


def test_a_quiet_grid_prints_nothing_but_still_counts(capsys):
    grid = grid_started(10, quiet=True)
    grid.say("planned 10 cells")
    grid.cell_done("a", "FAILED", failed=True)
    assert capsys.readouterr().out == ""
    assert (grid.done, grid.failed) == (1, 1)


def test_a_cells_start_is_a_line_only_at_verbose(level, capsys):
    grid = grid_started(0)
    grid.started_cell("baseline/lr=0.003/seed=0")
    grid.say("resuming")
    level("verbose")
    grid.started_cell("baseline/lr=0.003/seed=1")
    assert capsys.readouterr().out.splitlines() == ["grid g: resuming",
                                                    "grid g: start baseline/lr=0.003/seed=1"]


# --- a run's lines ----------------------------------------------------------------------

def run_progress(total_steps=100, min_interval_s=0.0, start_step=0, seconds_ago=10.0):
    """A RunProgress as on_train_start leaves it, its start moved `seconds_ago` back."""
    bar = RunProgress("baseline", total_steps, tokens_per_step=1000, min_interval_s=min_interval_s)
    bar.on_train_start(SimpleNamespace(global_step=start_step), None)
    bar._start = bar._printed = (time.perf_counter() - seconds_ago, start_step)
    return bar


def steps(bar, numbers, loss=3.21):
    for step in numbers:
        bar.on_train_batch_end(SimpleNamespace(global_step=step), None,
                               {"lm_loss": torch.tensor(loss)}, None, 0)


def test_a_run_prints_a_line_at_each_tenth_of_its_steps(capsys):
    bar = run_progress()
    steps(bar, [1, 5, 9, 10, 10, 10, 11, 19, 20])  # 10 three times: micro-batches of one step
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[2] for line in lines] == ["[baseline] step 10/100",
                                                       "[baseline] step 20/100"]
    # 10 steps in 10 s at 1000 tokens a step; 90 steps left at 1 step/s.
    assert re.fullmatch(r"    \[baseline\] step 10/100  loss 3\.2100  1,000 tokens/s  ETA 1m30s",
                        lines[0])


def test_the_rate_of_a_resumed_run_counts_only_the_steps_it_trained(capsys):
    bar = run_progress(start_step=50, seconds_ago=5.0)
    steps(bar, [60])  # 10 steps in 5 s
    assert capsys.readouterr().out.rstrip().endswith("2,000 tokens/s  ETA 20s")


def test_lines_are_at_most_one_per_interval_except_at_verbose(level, capsys):
    bar = run_progress(min_interval_s=3600)
    steps(bar, [10, 20, 30])
    assert capsys.readouterr().out == ""
    level("verbose")
    bar = run_progress(min_interval_s=3600)
    steps(bar, [10, 20, 30])
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_a_short_run_prints_every_step_and_a_missing_loss_as_a_question_mark(capsys):
    bar = run_progress(total_steps=3)
    bar.on_train_batch_end(SimpleNamespace(global_step=1), None, None, None, 0)
    steps(bar, [2, 3])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[2] for line in lines] == [f"[baseline] step {i}/3" for i in (1, 2, 3)]
    assert "  loss ?  " in lines[0] and "  loss 3.2100  " in lines[1]


def test_nothing_is_printed_before_training_starts(capsys):
    bar = RunProgress("baseline", 100, 1000, min_interval_s=0)
    steps(bar, [10])
    assert capsys.readouterr().out == ""
