"""Experiments and runs found by name and tags: an experiment created on first use, every
run matching a filter, and the one parent run of a grid or a study, created once however
many processes ask for it together."""

from __future__ import annotations

import os
import sqlite3
from contextlib import nullcontext

from filelock import FileLock

from lab.errors import LabError
from lab.records.cells import GRID_PARENT_TAG, GRID_TAG
from lab.records.store import LOCK_TIMEOUT_S, default_uri, sqlite_path, store_dir
from lab.records.views import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, comparison_view_state,
                               read_comparison_view, write_comparison_view)

RUN_NAME_TAG = "mlflow.runName"  # mlflow.utils.mlflow_tags.MLFLOW_RUN_NAME
# (MLflow is imported where it is used: the store's grids are read without it for a one-line
# error, missing_grid)


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, created on first use (artifacts under mlruns/artifacts/<name>),
    marked as a model-training experiment and given the comparison view (lab/records/views.py); an older
    experiment gets both, or the view as the lab now writes it, the first time the lab opens
    it again."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        if EXPERIMENT_KIND_TAG not in found.tags:
            mlflow_client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG,
                                             MODEL_TRAINING_KIND)
        if read_comparison_view(found.tags) != comparison_view_state():
            write_comparison_view(mlflow_client, found.experiment_id)  # the lab's view changed
        return found.experiment_id
    from mlflow.exceptions import MlflowException

    location = None
    if uri.startswith("sqlite:"):
        location = (store_dir() / "artifacts" / name.replace("/", "_")).as_uri()
    try:
        created = mlflow_client.create_experiment(name, artifact_location=location,
                                                  tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except MlflowException:  # another worker created it first
        return mlflow_client.get_experiment_by_name(name).experiment_id
    write_comparison_view(mlflow_client, created)
    return created


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
    with them and `extra_tags`. Returns (run id, created by this call).

    On a SQLite store, processes look and create under a lock beside the file, so two
    started together find one run. Elsewhere (a tracking server, another database) two
    processes creating it at once both look again: the earliest run wins and the other
    deletes its own."""
    uri = str(mlflow_client.tracking_uri)
    path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    with FileLock(f"{path}.parent.lock", timeout=LOCK_TIMEOUT_S) if path else nullcontext():
        found = find_run(mlflow_client, experiment_id, match_tags)
        if found:
            return found, False
        mine = mlflow_client.create_run(experiment_id,
                                        tags={RUN_NAME_TAG: run_name, **match_tags,
                                              **(extra_tags or {})}).info.run_id
        winner = find_run(mlflow_client, experiment_id, match_tags)
    if winner != mine:
        mlflow_client.delete_run(mine)
    return winner, winner == mine


def find_grid_parent(mlflow_client, experiment_id: str) -> str | None:
    return find_run(mlflow_client, experiment_id, {GRID_PARENT_TAG: "true"})


def find_or_create_grid_parent(mlflow_client, experiment_id: str, name: str,
                               extra_tags: dict[str, str] | None = None) -> str:
    """One parent per grid name (find_or_create_run: under a lock beside a SQLite store, so
    two grids started together find one), which holds the cells' claims; `extra_tags` go on
    a parent created here."""
    return find_or_create_run(mlflow_client, experiment_id,
                              {GRID_PARENT_TAG: "true", GRID_TAG: name}, name, extra_tags)[0]


def child_runs(mlflow_client, experiment_id: str, parent_run_id: str) -> list:
    return search_all(mlflow_client, experiment_id,
                      f"tags.mlflow.parentRunId = '{parent_run_id}'")


def grid_cell_runs(mlflow_client, name: str) -> tuple[str, list] | None:
    """The parent run of the grid called `name` and its cells' runs (any status), read only;
    None where the store holds no such grid."""
    experiment = mlflow_client.get_experiment_by_name(name)
    parent = find_grid_parent(mlflow_client, experiment.experiment_id) if experiment else None
    if parent is None:
        return None
    return parent, child_runs(mlflow_client, experiment.experiment_id, parent)


def no_grid(grid: str, uri: str, grids: list[str]) -> LabError:
    """The error for a grid the store at `uri` does not hold, naming the ones it does."""
    return LabError(f"report: no grid named {grid!r} in {uri}; grids there: "
                    f"{', '.join(sorted(grids)) or 'none (run `gatelab grid FILE` first)'}")


def missing_grid(grid: str, uri: str | None = None) -> LabError | None:
    """no_grid's error where a SQLite store (tracking_uri's choice: `uri`, else
    MLFLOW_TRACKING_URI, else the local store) plainly lacks `grid`: no file, or no
    experiment of that name; read with sqlite3 alone, so that the error does not wait for
    MLflow's import (1.4 s). None wherever that cannot be told so: MLflow then decides."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    try:
        path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    except Exception:  # not a URL MLflow could use either: tracking_uri says so
        return None
    if path is None or path.is_dir():
        return None
    if not path.exists():
        return no_grid(grid, uri, [])
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            if db.execute("SELECT 1 FROM experiments WHERE name = ?", (grid,)).fetchone():
                return None
            grids = [name for (name,) in db.execute(
                "SELECT DISTINCT e.name FROM experiments e JOIN runs r ON r.experiment_id = "
                "e.experiment_id JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = ? AND "
                "t.value = 'true' AND e.lifecycle_stage = 'active' AND r.lifecycle_stage = "
                "'active'", (GRID_PARENT_TAG,))]
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return no_grid(grid, uri, grids)
