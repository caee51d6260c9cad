"""`gatelab analyze`: the analysis (lab/analysis/) recomputed from a run's checkpoint, into
its MLflow record or a folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlflow.exceptions import MlflowException

from lab import records
from lab.analysis.metrics import Analysis, analysis_device, analyze
from lab.analysis.outputs import log_analysis, write_outputs
from lab.errors import LabError
from lab.model.decoder import Decoder
from lab.training.corpus import open_data


def analyze_target(target: str, uri: str | None = None, windows: int | None = None,
                   long_context: str | None = None, out: str | None = None,
                   ) -> tuple[str | None, Analysis, list[str]]:
    """`target` is an MLflow run id (its `checkpoints/<run id>/last.ckpt`) or a checkpoint
    file. Metrics and plots go to the run when there is one, and to `out` when given.
    Returns (run id or None, the analysis, the files written)."""
    # Input first, the store after: a bad target or option must not create a store.
    if windows is not None and windows < 0:
        raise LabError(f"analyze --windows: must be a non-negative integer, got {windows}")
    path = records.checkpoint_path(target, "analyze")
    run_id = path.parent.name if path.parent.parent.name == "checkpoints" else None
    uri = records.tracking_uri(uri)
    mlflow_client = records.client(uri) if run_id is not None else None
    if run_id is not None and not _run_exists(mlflow_client, run_id):
        if not Path(target).exists():  # named by its run id: it must be in this store
            raise LabError(f"analyze: run {run_id} is not in the tracking store {uri} "
                           "(pass --tracking-uri, or the checkpoint path with --out)")
        run_id = None  # a checkpoint of a run this tracking store does not hold
    if run_id is None and out is None:
        out = f"analysis-{path.stem}"

    config, state, step = records.read_checkpoint(path, "analyze")
    model = Decoder(config.model)
    model.load_state_dict(state)
    train = config.train
    if windows is not None:
        train = dataclasses.replace(train, analysis_windows=windows)
    if long_context is not None:
        train = dataclasses.replace(train, long_context_factors=long_context)
    train.validate()
    config = dataclasses.replace(config, train=train)
    store, _ = open_data(config)
    if store.vocab_size != config.model.vocab_size:
        raise LabError(f"analyze: the data {config.data.source!r} has vocabulary "
                       f"{store.vocab_size}, the checkpoint {config.model.vocab_size}")
    result = analyze(model.to(analysis_device()), store, config)
    files: list[str] = []
    if run_id is not None:
        files += [f"analysis/{name}" for name in log_analysis(mlflow_client, run_id, result, step)]
    if out is not None:
        files += [str(path) for path in write_outputs(result, Path(out))]
    return run_id, result, files


def _run_exists(mlflow_client, run_id: str) -> bool:
    try:
        mlflow_client.get_run(run_id)
        return True
    except MlflowException:
        return False


def summary(result: Analysis) -> str:
    """The headline numbers, one per line (per-layer values are in analysis.json)."""
    if result.skipped:
        return f"analysis skipped: {result.skipped}"
    return "\n".join(f"{name:36s} {value:.4g}" for name, value in sorted(result.metrics.items())
                     if not name.startswith("layers/"))
