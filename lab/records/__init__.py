"""The lab's records: MLflow's store, experiments and runs as the lab lays them out, and the
checkpoints beside them.

Code outside the package calls these names through the package (`from lab import records`,
then `records.start_run(...)`); where each lives:
- `store.py`: the tracking URI and the SQLite store file (refused, created or upgraded whole);
- `cells.py`: every tag name the lab writes on runs, the LR's text (format_lr, parse_lr) and
  a run read back as the cell it holds (`CellRecord.from_run`);
- `views.py`: what MLflow's UI shows of an experiment (its kind, the comparison view);
- `lookup.py`: experiments and runs found by name and tags, a parent run created once
  (a grid's, and its cells' runs);
- `runs.py`: one run's record (tags, params, metrics, artifacts), its start, its heartbeat
  while it trains, and its end;
- `owners.py`: which process owns a run (or a claim, a trial) and whether it still lives,
  and the end of the runs a dead owner left RUNNING;
- `checkpoints.py`: where a run's checkpoint is and the one safe way to read it;
- `snapshot.py`: the store (or one grid of it) packed into one file, and such files unpacked
  elsewhere, merged (`gatelab store`),
  used through its module: `from lab.records import snapshot`.

Each name is imported from its module when first used (PEP 562 `__getattr__`), not when the
package is: `records.store_dir()` needs neither MLflow nor torch, and a command's one-line
error should not wait seconds for them (benchmarks/README.md, start-up).
"""

from __future__ import annotations

import importlib

HOMES = {
    "cells": ["ANALYSIS_TAG", "CLAIM_PARAM", "CLAIM_TAG", "CONFIG_HASH_TAG", "CellRecord", "DATA_TAG",
              "DEVICE_TAG", "DIVERGED_TAG", "FAILURE_KIND_TAG", "FAILURE_TAG", "GIT_COMMIT_TAG",
              "GRID_PARENT_TAG", "GRID_TAG", "HEARTBEAT_TAG", "KILLED_REASON_TAG", "LR_TAG",
              "OWNER_TAG", "PRESET_TAG", "RESUMED_TAG", "RUNS_PER_GPU_TAG", "SEED_TAG",
              "STATE_TAG", "STUDY_TAG", "SWEEP_ROLE_TAG", "SWEEP_TAG", "TRIAL_TAG", "VARIANT_TAG",
              "cell_name", "format_lr", "parse_lr"],
    "checkpoints": ["checkpoint_dir", "checkpoint_path", "load_checkpoint", "read_checkpoint",
                    "run_id_from_prefix"],
    "lookup": ["child_runs", "experiment_id", "find_grid_parent",
               "find_or_create_grid_parent", "find_or_create_run", "find_run", "grid_cell_runs",
               "search_all"],
    "owners": ["STALE_AFTER_S", "end_dead_runs", "is_local", "kill_dead_run",
               "owner_alive", "owner_identity", "run_owner_alive"],
    "runs": ["HEARTBEAT_S", "describe_failure", "device_name", "end_run",
             "finite_metrics", "git_commit", "heartbeat", "log_check_table", "log_corpus",
             "log_metrics", "log_params", "log_yaml", "read_artifact_text", "run_tags",
             "start_run", "system_metrics", "system_metrics_enabled"],
    "store": ["check_writable", "client", "open_store", "store_dir", "tracking_uri"],
    "views": ["experiments_page_url", "run_page_url", "runs_page_url"],
}
_HOME = {name: module for module, names in HOMES.items() for name in names}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value
