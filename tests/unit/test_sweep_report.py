"""lab/reports/sweep_report.py: the table, summary.json and plot of a sweep's studies, and
their copies on the studies' MLflow parent runs, from a journal of made-up trials (no
training here; tests/integration/test_sweep.py reports on a sweep that really ran)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from lab import records
from lab.cli import main
from lab.reports.sweep_report import format_summary, sweep_report
from sweepkit import made_up_trial

@pytest.fixture
def recorded_sweep(store, tmp_path):
    """Sweep `r` in its default journal (sweeps/r.journal): baseline diverges at 1e-1 and is
    best at 3e-3; gated is best at 1e-2 and stable up to 3e-2. One MLflow parent run per study."""
    (tmp_path / "sweeps").mkdir()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "sweeps" / "r.journal")))
    trials = {"baseline": [made_up_trial(1e-3, 3.00, spikes=1), made_up_trial(3e-3, 2.90),
                           made_up_trial(1e-1, state="diverged"),
                           made_up_trial(3e-2, state="pruned")],
              "gated": [made_up_trial(1e-3, 3.10), made_up_trial(1e-2, 2.80),
                        made_up_trial(3e-2, 2.84)]}
    client = records.client(records.tracking_uri())
    experiment = client.create_experiment("r")
    parents = {}
    for variant, made_up in trials.items():
        study = optuna.create_study(study_name=f"r/{variant}", storage=storage)
        study.add_trials(made_up)
        parents[variant] = client.create_run(experiment, tags={
            "sweep_role": "parent", "variant": variant}).info.run_id
    return tmp_path, client, parents


def test_the_table_names_best_and_max_stable_lr_and_every_outcome(recorded_sweep):
    summaries, plot = sweep_report("r")
    text = format_summary(summaries)
    assert ("baseline: best lr 0.003 (val loss 2.9000), max stable lr 0.003 (within 2%, no "
            "divergence); trials: 2 complete, 1 pruned, 1 diverged") in text
    assert "gated: best lr 0.01 (val loss 2.8000), max stable lr 0.03" in text
    lines = text.splitlines()
    assert lines[1].split() == ["lr", "0.001", "val", "loss", "3.0000", "spikes", "1"]
    assert "lr 0.03" in lines[3] and lines[3].endswith("1 pruned")
    assert "lr 0.1" in lines[4] and lines[4].endswith("1 diverged")
    # A tighter tolerance leaves gated's 3e-2 (2.84, 1.4% above 2.80) out of the stable LRs.
    assert sweep_report("r", out="tight", tolerance=0.01)[0]["gated"].max_stable_lr == 1e-2


def test_the_files_land_in_reports_and_on_each_parent_run(recorded_sweep):
    root, client, parents = recorded_sweep
    summaries, plot = sweep_report("r")
    folder = root / "reports" / "sweeps" / "r"
    assert plot == Path("reports/sweeps/r/val_loss_vs_lr.png") and plot.stat().st_size > 10_000
    assert (folder / "summary.txt").read_text() == format_summary(summaries) + "\n"
    written = json.loads((folder / "summary.json").read_text())
    assert written["baseline"]["best_lr"] == 3e-3 and written["gated"]["max_stable_lr"] == 3e-2
    assert written["baseline"]["counts"] == {"complete": 2, "pruned": 1, "diverged": 1, "failed": 0}
    for run_id in parents.values():
        logged = {a.path for a in client.list_artifacts(run_id, "sweep_report")}
        assert logged == {"sweep_report/val_loss_vs_lr.png", "sweep_report/summary.txt",
                          "sweep_report/summary.json"}


def test_the_command_prints_the_table_and_the_plot(recorded_sweep, capsys):
    root, _, _ = recorded_sweep
    assert main(["sweep-report", "r", "--out", "elsewhere"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("baseline: best lr 0.003 ")
    assert out.rstrip().endswith("plot: elsewhere/val_loss_vs_lr.png")
    assert (root / "elsewhere" / "summary.json").is_file()


def test_a_sweep_without_studies_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    (tmp_path / "sweeps").mkdir()
    optuna.create_study(study_name="other/baseline", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "sweeps" / "r.journal"))))
    assert main(["sweep-report", "r"]) == 2
    error = capsys.readouterr().err
    assert "error: sweep: no studies named r/<variant> in sweeps/r.journal" in error
