"""Where an analysis goes: `analysis.json` and the plots in a folder, and the same with its
metrics into the run's MLflow record."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from lab import records
from lab.analysis.metrics import Analysis
from lab.analysis.names import layer_metric, split_layer_metric
from lab.analysis.plots import write_plots


# The per-layer metrics as one table per run (MLflow's table JSON, pandas' "split" form:
# {"columns": [...], "data": [[...], ...]}): a row per layer, a column per per-layer metric
# with its `layers/` prefix dropped. One artifact where the metrics are a name per layer and
# measure (hundreds at `base`: MLflow issue #24012 on what that does to its chart view).
LAYER_TABLE = "analysis/layers.json"


def layer_table(metrics: dict[str, float]) -> dict:
    """The `layers/<name>/layer_<i>` entries of `metrics` as LAYER_TABLE's content (a value a
    layer lacks, or a non-finite one, is null)."""
    by_name: dict[str, dict[int, float]] = {}
    for metric, value in metrics.items():
        parts = split_layer_metric(metric)
        if parts is not None:
            by_name.setdefault(parts[0].removeprefix("layers/"), {})[parts[1]] = value
    names = sorted(by_name)
    layers = sorted({layer for values in by_name.values() for layer in values})
    rows = [[layer] + [_finite_or_none(by_name[name].get(layer)) for name in names]
            for layer in layers]
    return {"columns": ["layer", *names], "data": rows}


def layer_metrics(table: dict) -> dict[str, float]:
    """LAYER_TABLE's content back as `layers/<name>/layer_<i>` metrics (layer_table's inverse,
    nulls left out), so a reader of either form sees the same names."""
    columns, n_layers = table["columns"], len(table["data"])
    return {layer_metric(name, row[0], n_layers): float(value)
            for row in table["data"] for name, value in zip(columns[1:], row[1:])
            if value is not None}


def _finite_or_none(value):
    return float(value) if value is not None and np.isfinite(value) else None


def log_analysis(mlflow_client, run_id: str, analysis: Analysis, step: int,
                 plots: bool = True) -> list[str]:
    """The summary metrics at `step`, the per-layer ones as LAYER_TABLE (not as metrics:
    runs recorded before 2026-12-05 hold them as `layers/...` metrics, which readers take
    where a run has no table: lab/reports/grid_report.py run_metrics), `analysis.json` and
    the plots; returns the files logged."""
    if analysis.skipped:
        mlflow_client.set_tag(run_id, records.ANALYSIS_TAG, f"skipped: {analysis.skipped}")
        return []
    summary = {k: v for k, v in analysis.metrics.items() if split_layer_metric(k) is None}
    records.log_metrics(mlflow_client, run_id, summary, step)
    mlflow_client.log_dict(run_id, layer_table(analysis.metrics), LAYER_TABLE)
    return _log_analysis_files(mlflow_client, run_id,
                               lambda folder: write_outputs(analysis, folder, plots))


def log_plots(mlflow_client, run_id: str, analysis: Analysis) -> list[str]:
    """The plots alone, into the run's `analysis` folder beside the `analysis.json` that
    log_analysis(plots=False) logged: a grid's own process draws its workers' (lab/
    experiments/grid/plots.py). Returns the files logged."""
    if analysis.skipped:
        return []
    return _log_analysis_files(mlflow_client, run_id, lambda folder: write_plots(analysis, folder))


def _log_analysis_files(mlflow_client, run_id: str, write) -> list[str]:
    """What `write(folder)` writes, logged into the run's `analysis` folder; their names."""
    with tempfile.TemporaryDirectory() as tmp:
        names = [path.name for path in write(Path(tmp))]
        mlflow_client.log_artifacts(run_id, tmp, artifact_path="analysis")
    return names


def write_outputs(analysis: Analysis, folder: Path, plots: bool = True) -> list[Path]:
    """`analysis.json` (every metric and per-layer value) and the plots, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "analysis.json"
    path.write_text(json.dumps(analysis.to_json(), indent=1, default=_json_number))
    return [path] + (write_plots(analysis, folder) if plots and not analysis.skipped else [])


def _json_number(value):
    return float(value) if isinstance(value, (np.floating, np.integer)) else str(value)
