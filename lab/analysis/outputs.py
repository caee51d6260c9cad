"""Where an analysis goes: `analysis.json` and the plots in a folder, and the same with its
metrics into the run's MLflow record."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from lab import records
from lab.analysis.metrics import Analysis
from lab.analysis.plots import write_plots


def log_analysis(mlflow_client, run_id: str, analysis: Analysis, step: int,
                 plots: bool = True) -> list[str]:
    """Metrics at `step`, `analysis/analysis.json` and the plots; returns the files logged."""
    if analysis.skipped:
        mlflow_client.set_tag(run_id, "analysis", f"skipped: {analysis.skipped}")
        return []
    records.log_metrics(mlflow_client, run_id, analysis.metrics, step)
    with tempfile.TemporaryDirectory() as tmp:
        names = [path.name for path in write_outputs(analysis, Path(tmp), plots)]
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
