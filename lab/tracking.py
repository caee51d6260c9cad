"""MLflow: the local SQLite store, experiments, runs, and the Lightning logger.

Always an explicit tracking URI: `--tracking-uri`, else MLFLOW_TRACKING_URI, else the
SQLite store `mlruns/mlflow.db` under the working directory, with artifacts in
`mlruns/artifacts/` beside it (never the deprecated file store).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import yaml

STORE_DIR = "mlruns"


def cell_name(variant: str, lr: float, seed: int) -> str:
    """A run's name in the store: a grid cell's, and the default for a single run."""
    return f"{variant}/lr={lr:g}/seed={seed}"



def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics MLflow can store: NaN, infinities and None left out."""
    import math

    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """The finite ones in one log_batch call (MLflow splits it into batches it accepts)."""
    import time

    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, v, stamp, step)
                                             for k, v in finite_metrics(metrics).items()])

def store_dir() -> Path:
    return Path(os.environ.get("GATELAB_STORE", STORE_DIR)).resolve()


def tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = store_dir()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, created on first use (artifacts under mlruns/artifacts/<name>)."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (store_dir() / "artifacts" / name.replace("/", "_")).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another worker created it first
        return mlflow_client.get_experiment_by_name(name).experiment_id


def search_all(mlflow_client, experiment_id: str, filter_string: str) -> list:
    """Every active run of the experiment matching the filter, over all result pages."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY,
                                         max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_run(mlflow_client, experiment_id: str, match_tags: dict[str, str]) -> str | None:
    """The earliest active run carrying every tag of `match_tags`, or None."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in match_tags.items())
    runs = search_all(mlflow_client, experiment_id, query)
    runs.sort(key=lambda r: (r.info.start_time, r.info.run_id))
    return runs[0].info.run_id if runs else None


def find_or_create_run(mlflow_client, experiment_id: str, match_tags: dict[str, str],
                       run_name: str, extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The earliest run carrying `match_tags` (a grid's or a study's parent), else a new one
    with them and `extra_tags`. Two processes creating it at once both look again: the
    earliest run wins and the other deletes its own. Returns (run id, created by this call)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    found = find_run(mlflow_client, experiment_id, match_tags)
    if found:
        return found, False
    mine = mlflow_client.create_run(experiment_id,
                                    tags={MLFLOW_RUN_NAME: run_name, **match_tags,
                                          **(extra_tags or {})}).info.run_id
    winner = find_run(mlflow_client, experiment_id, match_tags)
    if winner != mine:
        mlflow_client.delete_run(mine)
    return winner, winner == mine


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_dict_artifact(mlflow_client, run_id: str, data, filename: str) -> None:
    """Write `data` as YAML or JSON (by extension) and attach it to the run."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        if filename.endswith((".yaml", ".yml")):
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2, default=str))
        mlflow_client.log_artifact(run_id, str(path))


def log_params(mlflow_client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        mlflow_client.log_batch(run_id, params=items[start:start + 100])


def lightning_logger(uri: str, run_id: str):
    """Lightning's MLflow logger on an existing run; the run's status is ours to set."""
    from lightning.pytorch.loggers import MLFlowLogger

    class _RunLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            pass  # lab/run.py terminates the run once test metrics and artifacts are in

        def log_hyperparams(self, params) -> None:
            pass  # the resolved config is logged once, flattened, by lab/run.py

    return _RunLogger(tracking_uri=uri, run_id=run_id, synchronous=True)
