"""lab/experiments/grid/plots.py: the grid's own process draws its pool workers' plots on a
thread; a failure there is said on stderr and in the run's `analysis` tag, never lost in
the thread. (The plots drawn into a real run: tests/integration/test_grid.py.)"""

from __future__ import annotations

from lab import records
from lab.analysis.metrics import Analysis
from lab.experiments.grid import plots


class TagClient:
    def __init__(self, tags: dict):
        self.tags = tags

    def set_tag(self, run_id, key, value):
        self.tags[(run_id, key)] = value


def test_a_plot_that_fails_is_said_and_tagged_and_the_next_is_drawn(monkeypatch, capsys):
    tags, drawn = {}, []

    def log_plots(client, run_id, analysis):
        if run_id == "bad":
            raise ValueError("no figure")
        drawn.append(run_id)
        return ["gate_scores.png"]

    monkeypatch.setattr(records, "client", lambda uri: TagClient(tags))
    monkeypatch.setattr(plots, "log_plots", log_plots)
    parent = plots.ParentPlots("sqlite:///unused.db")
    parent.draw("bad", Analysis())
    parent.draw("good", Analysis())
    parent.close()
    assert drawn == ["good"]
    assert tags == {("bad", records.ANALYSIS_TAG): "plots failed: ValueError: no figure"}
    assert "warning: run bad: plots failed: ValueError: no figure" in capsys.readouterr().err


def test_a_store_the_plot_thread_cannot_open_is_said_too(monkeypatch, capsys):
    """The client is made on the thread, inside its try: were it made before, its failure
    would stay in the thread's future, and nobody would hear of the missing figures."""

    def refuse(uri):
        raise RuntimeError("store is locked")

    monkeypatch.setattr(records, "client", refuse)
    parent = plots.ParentPlots("sqlite:///unused.db")
    parent.draw("run1", Analysis())
    parent.close()
    assert "warning: run run1: plots failed: RuntimeError: store is locked" in \
        capsys.readouterr().err
