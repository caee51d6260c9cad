"""Shared by the grid, report and reliability tests: a grid small enough to train in about a
second per cell on one CPU thread, and the targets of the processes they fork and kill (the
test's store: the `store` fixture, conftest.py)."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

# Worker and fork-server processes import from sys.path, where '' would mean the changed
# working directory of a test: name this checkout and this folder explicitly.
for _path in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# 16 steps of 8 windows of 32 tokens; validation (and a checkpoint) every 4 steps.
TINY_OVERRIDES = {"model.context": 32, "train.batch_size": 8, "train.val_every": 4,
                  "train.val_batches": 2, "train.log_every": 2}
TINY_TOKENS = 4096


def tiny_grid(name: str, variants, seeds=(0,), lrs=(3e-3,), **overrides) -> dict:
    return {"name": name, "preset": "tiny", "data": "synthetic", "tokens": TINY_TOKENS,
            "variants": list(variants), "seeds": list(seeds), "lrs": list(lrs),
            "overrides": {**TINY_OVERRIDES, **overrides}}


def run_statuses(uri: str, experiment: str) -> dict[str, list[str]]:
    """Child runs' statuses by run name, read with sqlite3 (no MLflow engine in this process,
    which matters for tests that fork)."""
    path = uri[len("sqlite:///"):]
    with sqlite3.connect(path, timeout=30) as db:
        rows = db.execute(
            "SELECT r.name, r.status FROM runs r JOIN experiments e ON r.experiment_id = "
            "e.experiment_id WHERE e.name = ? AND r.lifecycle_stage = 'active' AND EXISTS "
            "(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId')",
            (experiment,)).fetchall()
    out: dict[str, list[str]] = {}
    for name, status in rows:
        out.setdefault(name, []).append(status)
    return out


def run_grid_process(raw: dict, env: dict) -> None:
    """Target of a forked grid process (the crash tests SIGKILL it). As cli_process: only
    `env` may name the store (a fork server started after an in-process run had MLflow's
    exported URI, and the grid's runs went to that test's store instead)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.update(env)
    from lab.experiments.grid.run import GridOptions, run_grid
    from lab.experiments.schema import grid_from_dict

    run_grid(grid_from_dict(raw), GridOptions(quiet=True, cpu_threads=1))


def cli_process(argv: list[str], env: dict) -> None:
    """Target of a forked `gatelab` command: its exit code is the process's. The fork server
    keeps the environment of the moment it started, and MLflow exports the tracking URI of
    any earlier in-process run to MLFLOW_TRACKING_URI: only `env` may name a store here."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.update(env)
    import torch

    from lab.cli import main

    torch.set_num_threads(1)
    sys.exit(main(argv))


def create_store_process(uri: str) -> None:
    """Target that opens a fresh store the lab's way and records an experiment in it."""
    from lab import records

    records.client(uri).create_experiment("kept")


def nothing() -> None:
    """Target that only makes the fork server start."""


def grid_processes():
    """Processes forked from a clean server that has imported the lab once: a SIGKILL trial
    then costs a fork, not an interpreter start with torch, Lightning and MLflow."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    # Third-party modules only: the server preloads before it takes the test's sys.path,
    # so a preloaded `lab` could be another checkout's.
    context.set_forkserver_preload(["torch", "lightning", "mlflow", "mlflow.tracking", "yaml"])
    return context


def cli_in_own_group(argv: list[str], env: dict, cwd: str, log: str) -> None:
    """Target of a forked `gatelab` command that leads its own process group (the
    kill-and-resume test SIGKILLs the group), run in `cwd`, its output appended to `log`.
    It sees one core: a sweep gives its workers os.cpu_count() / workers torch threads
    (lab.experiments.pool.threads_per_worker), and the tests train on one thread (conftest.py)."""
    os.setsid()
    os.cpu_count = lambda: 1
    os.chdir(cwd)
    with open(log, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    cli_process(argv, env)


class ForkedCommand:
    """A Popen-like handle (pid, wait, returncode) of cli_in_own_group forked from
    `context`'s server: what benchmarks/kill_resume.py's measure() takes as `launch`, at the
    cost of a fork instead of an interpreter start."""

    def __init__(self, context, argv: list[str], workdir, log, env: dict):
        import time

        self.process = context.Process(target=cli_in_own_group,
                                       args=(argv, env, str(workdir), log.name))
        self.process.start()
        self.pid = self.process.pid
        # Returned only once the child leads its group, so that a kill at once finds it.
        while self.process.is_alive():
            try:
                if os.getpgid(self.pid) == self.pid:
                    break
            except ProcessLookupError:
                break
            time.sleep(0.005)

    def wait(self, timeout: float | None = None) -> int | None:
        import subprocess

        self.process.join(timeout)
        if self.process.is_alive():
            raise subprocess.TimeoutExpired("gatelab", timeout)
        return self.returncode

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode
