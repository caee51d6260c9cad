"""The lab's records: MLflow's store, experiments and runs as the lab lays them out, and the
checkpoints beside them.

Code outside the package calls these names through the package (`from lab import records`,
then `records.start_run(...)`); where each lives:
- `store.py`: the tracking URI and the SQLite store file (refused, created or upgraded whole);
- `views.py`: what MLflow's UI shows of an experiment (its kind, the comparison view);
- `lookup.py`: experiments and runs found by name and tags, a parent run created once
  (a grid's, and its cells' runs);
- `runs.py`: one run's record (tags, params, metrics, artifacts), its start, its heartbeat
  while it trains, and its end;
- `checkpoints.py`: where a run's checkpoint is and the one safe way to read it;
- `snapshot.py`: the store (or one grid of it) packed into one file, and such files unpacked
  elsewhere, merged (`gatelab store`),
  used through its module: `from lab.records import snapshot`.
"""

from lab.records.checkpoints import (checkpoint_dir, checkpoint_path, load_checkpoint,
                                     read_checkpoint, run_id_from_prefix)
from lab.records.lookup import (GRID_PARENT_TAG, GRID_TAG, child_runs, experiment_id,
                                find_grid_parent, find_or_create_grid_parent,
                                find_or_create_run, find_run, grid_cell_runs, search_all)
from lab.records.runs import (DEVICE_TAG, FAILURE_KIND_TAG, FAILURE_TAG, HEARTBEAT_S,
                              HEARTBEAT_TAG, KILLED_REASON_TAG, cell_name, describe_failure,
                              device_name, end_run,
                              finite_metrics, git_commit, heartbeat, log_check_table,
                              log_metrics, log_params, log_yaml, run_tags, start_run)
from lab.records.store import client, open_store, store_dir, tracking_uri
from lab.records.views import runs_page_url

__all__ = [
    "checkpoint_dir", "checkpoint_path", "load_checkpoint", "read_checkpoint",
    "run_id_from_prefix",
    "GRID_PARENT_TAG", "GRID_TAG", "child_runs", "experiment_id", "find_grid_parent",
    "find_or_create_grid_parent", "find_or_create_run", "find_run", "grid_cell_runs",
    "search_all",
    "DEVICE_TAG", "FAILURE_KIND_TAG", "FAILURE_TAG", "HEARTBEAT_S", "HEARTBEAT_TAG",
    "KILLED_REASON_TAG", "cell_name", "describe_failure", "device_name", "end_run", "finite_metrics", "git_commit", "heartbeat",
    "log_check_table", "log_metrics", "log_params", "log_yaml", "run_tags", "start_run",
    "client", "open_store", "store_dir", "tracking_uri",
    "runs_page_url",
]
