"""Kill and resume, measured: SIGKILL a `gatelab grid` and a `gatelab sweep` (each command's
whole process group: the command, its fork server and its workers) at random moments,
rerun it after each kill, let the last rerun finish, and compare the store with that of
the same command run once without interruption on a fresh store.

    .venv/bin/python benchmarks/kill_resume.py [--kills 10] [--seed 1] [--what grid,sweep]
        [--workers 2] [--window 0.5] [--storage journal|sqlite] [--workdir DIR] [--json OUT]

Runs on a CPU in minutes: the tiny preset on synthetic tokens, 2 CPU workers. The grid's
workers train on one torch thread each (--cpu-threads 1), so the uninterrupted and the
killed runs sum floating-point numbers in the same order. The sweep's workers split the
cores; a rerun with fewer trials left than workers starts fewer workers, each with more
threads, which on the tiny preset gives bit-identical values (measured: 1 and 2 threads)
and on larger models may not. The figures are in docs/reliability.md, "Kill and resume,
measured"; tests/integration/test_reliability.py::test_kill_resume_of_the_command_s_process_group is
the same measurement reduced for CI.

What is checked:
- grid: every cell has exactly one FINISHED run and no run is left RUNNING (the killed ones
  are marked KILLED by the next rerun's reconcile); each cell's final metrics, its per-step
  loss history and its MLflow train/loss history equal the uninterrupted grid's.
- sweep: every study ends with exactly its trial budget finished (COMPLETE or PRUNED), each
  point of the LR ladder finished exactly once (a killed trial ends FAIL and is run again),
  nothing RUNNING or WAITING in Optuna or RUNNING in MLflow, one FINISHED MLflow run per
  finished trial that trained to the end, and the values, the states and the best value
  of each study equal the uninterrupted sweep's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# 6 cells of 512 steps (8 windows of 32 tokens); validation every 8 steps, a checkpoint
# every 16 (a step cadence: the default, at validations at most every 5 minutes, would
# leave these short runs nothing to resume from).
GRID = {"name": "kill-resume", "preset": "tiny", "data": "synthetic", "tokens": 131072,
        "variants": ["baseline", "sdpa_elementwise_sigmoid_mul", "sdpa_headwise_sigmoid_mul"],
        "seeds": [0, 1],
        "lrs": [3e-3],
        "overrides": {"model.context": 32, "train.batch_size": 8, "train.val_every": 8,
                      "train.val_batches": 2, "train.log_every": 4,
                      "train.checkpoint_every": 16}}
# 2 studies x 8 trials of 128 steps; LR 30 diverges (a PRUNED trial, state diverged).
SWEEP = {"name": "kill-resume-sweep", "preset": "tiny", "data": "synthetic", "tokens": 32768,
         "variants": ["baseline", "sdpa_elementwise_sigmoid_mul"],
         "lr": {"ladder": [1e-3, 2e-3, 3e-3, 6e-3, 1e-2, 3e-2, 1e-1, 30.0]}, "pruner": "none",
         "overrides": {"model.context": 32, "train.batch_size": 8, "train.val_every": 8,
                       "train.val_batches": 2, "train.log_every": 4}}
# The metrics a grid cell ends with that do not measure time or speed.
FINAL_METRICS = ("val/final_loss", "val/ppl", "val/best_loss", "test/loss", "test/ppl",
                 "tokens/seen", "spikes/count", "spikes/max_excess", "train/grad_norm_max")
GROUP_EXIT_TIMEOUT_S = 30.0
STARTUP_GROWTH = 1.5


@dataclass
class Attempt:
    """One start of the command on the store under test."""

    kill_at_s: float | None      # the planned moment of the SIGKILL after the start; None: none
    started_at: float = 0.0      # time.time() at the start
    killed: bool = False         # the group was still running at that moment and got it
    exit_code: int | None = None
    wall_s: float = 0.0
    after: dict = field(default_factory=dict)   # what the store held once the group was gone


@dataclass
class Round:
    """A fresh store: starts killed at random moments until one runs to its end, then the
    store compared with the uninterrupted run's."""

    attempts: list[Attempt]
    checks: dict

    @property
    def kills(self) -> int:
        return sum(a.killed for a in self.attempts)


@dataclass
class Measurement:
    what: str
    command: list[str]
    reference_wall_s: float
    startup_s: float
    rounds: list[Round]
    total_wall_s: float
    label: str = ""              # what tells it from another measurement of `what`

    @property
    def kills(self) -> int:
        return sum(r.kills for r in self.rounds)

    @property
    def passed(self) -> bool:
        return all(r.checks["passed"] for r in self.rounds)


# --- running a command as its own process group ----------------------------------------

def environment(workdir: Path) -> dict:
    """The command's environment: its own store and data cache under `workdir` (the cache
    too, so the kills also meet the data's first preparation)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(GATELAB_STORE=str(workdir / "mlruns"), GATELAB_CACHE=str(workdir / "cache"),
               PYTHONUNBUFFERED="1")
    return env


def start(argv: list[str], workdir: Path, log) -> subprocess.Popen:
    """`gatelab ARGV` in `workdir`, as a new interpreter. start_new_session: the command leads
    a new process group (its pgid is its pid), and every process it starts (fork server,
    workers) is in it unless it moves itself out."""
    return subprocess.Popen([sys.executable, "-m", "lab", *argv], cwd=workdir,
                            env=environment(workdir), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_group_gone(pgid: int) -> None:
    """Orphaned members are reparented and reaped by init: wait until none is left, so the
    rerun never meets a process of the killed run."""
    deadline = time.monotonic() + GROUP_EXIT_TIMEOUT_S
    while group_alive(pgid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {pgid} still has members "
                               f"{GROUP_EXIT_TIMEOUT_S:.0f} s after SIGKILL")
        time.sleep(0.05)


def run_once(command: list[str], workdir: Path, kill_at_s: float | None, log_name: str,
             launch=start) -> Attempt:
    """Start the command; SIGKILL its whole group `kill_at_s` seconds later if it still runs.
    `launch(argv, workdir, log)` starts it as the leader of a new process group and returns
    a Popen-like handle (pid, wait(timeout), returncode)."""
    attempt = Attempt(kill_at_s)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / log_name, "wb") as log:
        started = time.monotonic()
        attempt.started_at = time.time()
        process = launch(command, workdir, log)
        try:
            process.wait(timeout=kill_at_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            attempt.killed = True
            process.wait()
        except BaseException:  # the measurement itself interrupted: leave nothing running
            os.killpg(process.pid, signal.SIGKILL)
            raise
        wait_group_gone(process.pid)
        attempt.wall_s = time.monotonic() - started
    attempt.exit_code = process.returncode
    return attempt


# --- the cases ---------------------------------------------------------------------------

class GridCase:
    """`gatelab grid` of a grid file's fields (`spec`) with `workers` CPU workers of one
    torch thread each."""

    what, label = "grid", ""

    def __init__(self, workers: int = 2, spec: dict = GRID):
        self.workers, self.spec, self.experiment = workers, spec, spec["name"]

    def prepare(self, workdir: Path) -> None:
        import yaml

        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "grid.yaml").write_text(yaml.safe_dump(self.spec, sort_keys=False))

    def command(self) -> list[str]:
        return ["grid", "grid.yaml", "--quiet", "--no-check",
                "--cpu-workers", str(self.workers), "--cpu-threads", "1"]

    def snapshot(self, workdir: Path) -> dict:
        """Cells with a FINISHED run, and cell runs left RUNNING (read with sqlite3: a kill
        may have come before the store was made)."""
        children = [r for r in _sqlite_runs(workdir, self.spec["name"]) if r["parent"]]
        steps = self.spec["tokens"] / (self.spec["overrides"]["train.batch_size"]
                                  * self.spec["overrides"]["model.context"])
        trained: dict[str, float] = {}  # the most steps any run of the cell logged
        for run in children:
            done = steps if run["status"] == "FINISHED" else min(run["last_step"], steps)
            trained[run["name"]] = max(trained.get(run["name"], 0), done)
        cells = len(self.spec["variants"]) * len(self.spec["seeds"]) * len(self.spec["lrs"])
        finished = sum(1 for r in children if r["status"] == "FINISHED")
        # progress: of whole cells (a cell's last steps are followed by its final evaluation
        # and analyses, which log no step); trained: of the training steps
        running = sum(r["status"] == "RUNNING" for r in children)
        return {"finished_cells": finished, "running_runs": running, "interrupted": running,
                "runs": len(children), "progress": round(finished / cells, 3),
                "trained": round(sum(trained.values()) / (steps * cells), 3)}

    def collect(self, workdir: Path) -> dict:
        """Per cell: the statuses of its runs, and its FINISHED run's metrics and histories."""
        from mlflow.tracking import MlflowClient

        from lab.reports.figures import loss_history

        client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(self.spec["name"])
        runs = client.search_runs([experiment.experiment_id], max_results=10000)
        cells: dict[str, dict] = {}
        parents = []
        for run in runs:
            if "mlflow.parentRunId" not in run.data.tags:
                parents.append(run.info.status)
                continue
            cell = cells.setdefault(run.data.tags["mlflow.runName"],
                                    {"statuses": [], "resumed": 0})
            cell["statuses"].append(run.info.status)
            cell["resumed"] += run.data.tags.get("gatelab.resumed") == "true"
            if run.info.status == "FINISHED":
                history = client.get_metric_history(run.info.run_id, "train/loss")
                cell["metrics"] = {k: run.data.metrics.get(k) for k in FINAL_METRICS}
                cell["loss_history"] = loss_history(client, run.info.run_id)[1]
                cell["mlflow_train_loss"] = sorted((m.step, m.value) for m in history)
        return {"cells": cells, "parents": parents}

    def compare(self, reference: dict, result: dict) -> dict:
        cells = result["cells"]
        expected = set(reference["cells"])
        differences = [abs(cells[name]["metrics"][k] - reference["cells"][name]["metrics"][k])
                       for name in expected & set(cells) if "metrics" in cells[name]
                       for k in FINAL_METRICS
                       if reference["cells"][name]["metrics"][k] is not None]
        relogged = sum(len(c["mlflow_train_loss"]) - len({s for s, _ in c["mlflow_train_loss"]})
                       for c in cells.values() if "mlflow_train_loss" in c)
        checks = {
            "cells": len(expected),
            "same_cells": set(cells) == expected,
            "finished_per_cell": sorted(Counter(c["statuses"].count("FINISHED")
                                                for c in cells.values()).items()),
            "running_runs": sum(c["statuses"].count("RUNNING") for c in cells.values())
            + result["parents"].count("RUNNING"),
            "killed_runs": sum(c["statuses"].count("KILLED") for c in cells.values()),
            "resumed_runs": sum(c["resumed"] for c in cells.values()),
            "parent_statuses": result["parents"],
            "max_metric_difference": max(differences, default=math.nan),
            "metrics_equal": all(cells.get(n, {}).get("metrics") == reference["cells"][n]["metrics"]
                                 for n in expected),
            "loss_histories_equal": all(cells.get(n, {}).get("loss_history")
                                        == reference["cells"][n]["loss_history"]
                                        for n in expected),
            # Steps between a run's last checkpoint and its kill are trained and logged
            # again when it resumes: MLflow keeps both entries (of equal values).
            "mlflow_train_loss_entries_logged_twice": relogged,
            "mlflow_train_loss_equal": all(
                sorted(set(cells.get(n, {}).get("mlflow_train_loss", [])))
                == reference["cells"][n]["mlflow_train_loss"] for n in expected),
        }
        checks["passed"] = bool(
            checks["same_cells"] and checks["finished_per_cell"] == [(1, len(expected))]
            and checks["running_runs"] == 0 and checks["metrics_equal"]
            and checks["loss_histories_equal"] and checks["mlflow_train_loss_equal"]
            and checks["parent_statuses"] == ["FINISHED"])
        return checks


class SweepCase:
    """`gatelab sweep` of a sweep file's fields (`spec`, an LR ladder) with `workers` worker
    processes, on a journal file or a SQLite Optuna storage."""

    what = "sweep"

    def __init__(self, workers: int = 2, storage: str = "journal", spec: dict = SWEEP):
        self.workers, self.storage, self.spec, self.experiment = workers, storage, spec, spec["name"]
        self.label = f"{storage} storage"

    def prepare(self, workdir: Path) -> None:
        import yaml

        (workdir / "sweeps").mkdir(parents=True, exist_ok=True)  # SQLite makes no folder
        (workdir / "sweep.yaml").write_text(yaml.safe_dump(self.spec, sort_keys=False))

    def command(self) -> list[str]:
        command = ["sweep", "sweep.yaml", "--quiet", "--no-check",
                   "--workers", str(self.workers)]
        if self.storage == "sqlite":
            command += ["--storage", "sqlite:///sweeps/optuna.db"]
        return command

    def _studies(self, workdir: Path) -> dict:
        import optuna

        from lab.experiments.sweep.storage import open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url = f"sqlite:///{workdir / 'sweeps' / 'optuna.db'}" if self.storage == "sqlite" \
            else str(workdir / "sweeps" / f"{self.spec['name']}.journal")
        if self.storage == "sqlite" and not (workdir / "sweeps" / "optuna.db").exists() or \
                self.storage == "journal" and not Path(url).exists():
            return {}
        storage = open_storage(url, create=False)
        return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
                for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}

    def snapshot(self, workdir: Path) -> dict:
        states = Counter()
        try:
            for study in self._studies(workdir).values():
                states.update(t.state.name for t in study.get_trials(deepcopy=False))
        except Exception as err:  # what a kill left unreadable is itself the finding
            return {"unreadable": f"{type(err).__name__}: {err}"}
        children = [r for r in _sqlite_runs(workdir, self.spec["name"]) if r["parent"]]
        budget = len(self.spec["variants"]) * len(self.spec["lr"]["ladder"])
        # Optuna's journal lock is a symlink beside the file: a kill while it is held leaves
        # it, and the next writer breaks it after its grace period (30 s).
        lock = workdir / "sweeps" / f"{self.spec['name']}.journal.lock"
        return {"trials": dict(sorted(states.items())), "interrupted": states["RUNNING"],
                **({"journal_lock_left": True} if lock.is_symlink() or lock.exists() else {}),
                "running_runs": sum(r["status"] == "RUNNING" for r in children),
                "progress": round((states["COMPLETE"] + states["PRUNED"]) / budget, 3)}

    def collect(self, workdir: Path) -> dict:
        from mlflow.tracking import MlflowClient

        studies = {}
        for name, study in self._studies(workdir).items():
            trials = study.get_trials(deepcopy=False)
            studies[name] = {
                "states": Counter(t.state.name for t in trials),
                "retried": sum("failed_trial" in t.system_attrs for t in trials),
                "finished_points": Counter((t.params["lr"], t.user_attrs.get("seed"))
                                           for t in trials if t.state.name in ("COMPLETE", "PRUNED")),
                "outcomes": {repr((t.params["lr"], t.user_attrs.get("seed"))):
                             (t.state.name, t.user_attrs.get("state"), t.value)
                             for t in trials if t.state.name in ("COMPLETE", "PRUNED")},
                "best_value": study.best_value if any(t.state.name == "COMPLETE" for t in trials)
                else None,
                "run_ids": [t.user_attrs.get("mlflow_run_id") for t in trials
                            if t.state.name == "COMPLETE" or t.user_attrs.get("state") == "diverged"],
            }
        client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(self.spec["name"])
        runs = client.search_runs([experiment.experiment_id], max_results=10000)
        status = {r.info.run_id: r.info.status for r in runs}
        for name, study in studies.items():
            children = [r for r in runs if r.data.tags.get("study") == name
                        and r.data.tags.get("sweep_role") != "parent"]
            study["mlflow"] = Counter(r.info.status for r in children)
            study["trained_trial_runs"] = Counter(status.get(i) for i in study.pop("run_ids"))
        parents = [r.info.status for r in runs if r.data.tags.get("sweep_role") == "parent"]
        return {"studies": studies, "parents": parents}

    def compare(self, reference: dict, result: dict) -> dict:
        per_study = {}
        budget = len(self.spec["lr"]["ladder"])
        for name, ref in reference["studies"].items():
            got = result["studies"].get(name)
            if got is None:
                per_study[name] = {"present": False}
                continue
            finished = got["states"]["COMPLETE"] + got["states"]["PRUNED"]
            trained = sum(1 for state, attr, _ in got["outcomes"].values()
                          if state == "COMPLETE" or attr == "diverged")
            per_study[name] = {
                "finished": finished, "budget": budget,
                "fail": got["states"]["FAIL"], "retried": got["retried"],
                "running": got["states"]["RUNNING"],
                "waiting": got["states"]["WAITING"],
                "each_point_once": set(got["finished_points"].values()) == {1}
                and set(got["finished_points"]) == set(ref["finished_points"]),
                "outcomes_equal": got["outcomes"] == ref["outcomes"],
                "best_value": got["best_value"], "reference_best_value": ref["best_value"],
                "mlflow_runs": dict(got["mlflow"]),
                "one_finished_run_per_trained_trial": got["mlflow"]["FINISHED"] == trained
                and got["trained_trial_runs"] == Counter({"FINISHED": trained}),
            }
        values = [(v[2], ref_v[2]) for name, ref in reference["studies"].items()
                  for point, ref_v in ref["outcomes"].items()
                  for v in [result["studies"].get(name, {}).get("outcomes", {}).get(point)]
                  if v is not None and v[2] is not None and ref_v[2] is not None]
        checks = {
            "studies": per_study,
            "budget": budget * len(self.spec["variants"]),
            "trials": sum(s.get("finished", 0) for s in per_study.values()),
            "each_point_once": all(s.get("each_point_once") for s in per_study.values()),
            "failed_trials": sum(s.get("fail", 0) for s in per_study.values()),
            "retried_trials": sum(s.get("retried", 0) for s in per_study.values()),
            "best_values_equal": all(s.get("best_value") == s.get("reference_best_value")
                                     for s in per_study.values()),
            "running": sum(s.get("running", 0) + s.get("waiting", 0) for s in per_study.values())
            + sum(s.get("mlflow_runs", {}).get("RUNNING", 0) for s in per_study.values())
            + result["parents"].count("RUNNING"),
            "max_value_difference": max((abs(a - b) for a, b in values), default=math.nan),
            "parent_statuses": result["parents"],
        }
        checks["passed"] = bool(
            len(per_study) == len(self.spec["variants"]) and checks["running"] == 0
            and checks["each_point_once"] and checks["best_values_equal"]
            and all(s.get("finished") == budget and s["outcomes_equal"]
                    and s["one_finished_run_per_trained_trial"] for s in per_study.values())
            and set(checks["parent_statuses"]) == {"FINISHED"})
        return checks


def _sqlite_runs(workdir: Path, experiment: str) -> list[dict]:
    """Runs of `experiment`: name, status, whether they have a parent, start time and the
    last step of their train/loss; [] while there is no such experiment (or no store)."""
    import sqlite3

    path = workdir / "mlruns" / "mlflow.db"
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=30) as db:
        try:
            rows = db.execute(
                "SELECT r.name, r.status, EXISTS (SELECT 1 FROM tags t WHERE t.run_uuid = "
                "r.run_uuid AND t.key = 'mlflow.parentRunId'), r.start_time, (SELECT "
                "MAX(m.step) FROM metrics m WHERE m.run_uuid = r.run_uuid AND m.key = "
                "'train/loss') FROM runs r JOIN experiments e ON r.experiment_id = "
                "e.experiment_id WHERE e.name = ?", (experiment,)).fetchall()
        except sqlite3.DatabaseError:
            return []
    return [{"name": n, "status": s, "parent": bool(p), "start_s": t / 1000,
             "last_step": step or 0} for n, s, p, t, step in rows]


# --- the measurement ---------------------------------------------------------------------

def measure(case, root: Path, kills: int, seed: int, window: float = 0.5,
            max_starts_per_round: int | None = None, say=print, launch=start) -> Measurement:
    """An uninterrupted run on a fresh store; then, on another fresh store, starts SIGKILLed
    at a moment drawn uniformly from [0, s + window x (1 - p) x W] until `kills` SIGKILLs
    have landed, then one start left to run to its end, and the store compared with the
    uninterrupted run's. Should the work be done before the kills have landed (a start ran
    to its end, or was killed after the last cell or trial finished), the round ends the
    same way and another begins on a fresh store.

    W is the uninterrupted run's training time (its wall time after its first training
    step), p the fraction of the work the store holds done (finished cells of the grid,
    finished trials of the sweep), s the start-up (imports, the store, the data, the
    workers: the time to the first training step) of the latest start that reached one,
    measured from the store, or STARTUP_GROWTH x the moment of a later start killed before
    any step, if that is longer. With window 1 each start would be killed at a moment
    uniform over about the time it takes to the end; below 1 the kills come before the end
    more often, while each start still advances the work."""
    began = time.monotonic()
    reference_dir = root / f"{case.what}-reference"
    case.prepare(reference_dir)
    command = case.command()
    reference_run = run_once(command, reference_dir, None, "reference.log", launch)
    if reference_run.exit_code != 0:
        raise RuntimeError(f"the uninterrupted {case.what} exited with code "
                           f"{reference_run.exit_code}; see {reference_dir / 'logs'}")
    reference = case.collect(reference_dir)
    startup_s = _first_step_s(reference_dir, case.experiment, reference_run.started_at) or 0.0
    work_s = reference_run.wall_s - startup_s
    say(f"{case.what}: uninterrupted run {reference_run.wall_s:.1f} s, its first training step "
        f"logged {startup_s:.1f} s after the start")
    rng = random.Random(seed)
    rounds: list[Round] = []
    most_starts = max_starts_per_round or 5 * kills
    while sum(r.kills for r in rounds) < kills:
        workdir = root / f"{case.what}-killed-{len(rounds) + 1}"
        case.prepare(workdir)
        attempts: list[Attempt] = []
        progress, estimate = 0.0, startup_s

        def record(attempt: Attempt) -> None:
            attempt.after = case.snapshot(workdir)
            attempts.append(attempt)
            planned = "no kill" if attempt.kill_at_s is None else f"kill at {attempt.kill_at_s:5.1f} s"
            outcome = "SIGKILL" if attempt.killed else \
                f"ran to its end (exit code {attempt.exit_code}, {attempt.wall_s:.1f} s)"
            say(f"{case.what}: round {len(rounds) + 1}, start {len(attempts):2d}, {planned}: "
                f"{outcome}; then {attempt.after}")

        while sum(r.kills for r in rounds) + sum(a.killed for a in attempts) < kills and \
                len(attempts) < most_starts and progress < 1 and \
                (not attempts or attempts[-1].killed):
            moment = rng.uniform(0.0, estimate + window * (1 - progress) * work_s)
            attempt = run_once(command, workdir, moment, f"start-{len(attempts) + 1:02d}.log",
                               launch)
            record(attempt)
            progress = attempt.after.get("progress", progress)
            # A start killed before its first step tells only that the start-up is longer
            # than the moment it was killed at (the first start of a round also builds the
            # store, which a kill makes the next start build again from nothing).
            estimate = _first_step_s(workdir, case.experiment, attempt.started_at) or \
                max(estimate, STARTUP_GROWTH * moment)
        if not attempts or attempts[-1].killed:
            record(run_once(command, workdir, None, f"start-{len(attempts) + 1:02d}.log", launch))
        checks = case.compare(reference, case.collect(workdir))
        checks["final_exit_code"] = attempts[-1].exit_code
        checks["passed"] = checks["passed"] and attempts[-1].exit_code == 0
        rounds.append(Round(attempts, checks))
        say(f"{case.what}: round {len(rounds)}: {rounds[-1].kills} SIGKILLs; passed "
            f"{checks['passed']}")
    return Measurement(case.what, ["gatelab", *command], reference_run.wall_s, startup_s, rounds,
                       time.monotonic() - began, case.label)


def _first_step_s(workdir: Path, experiment: str, since: float) -> float | None:
    """Seconds from `since` (time.time()) to the first train/loss any run of `experiment`
    logged after it; None when none did."""
    import sqlite3

    path = workdir / "mlruns" / "mlflow.db"
    if not path.exists():
        return None
    with sqlite3.connect(path, timeout=30) as db:
        try:
            (first,), = db.execute(
                "SELECT MIN(m.timestamp) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                "JOIN experiments e ON r.experiment_id = e.experiment_id WHERE e.name = ? AND "
                "m.key = 'train/loss' AND m.timestamp >= ?", (experiment, since * 1000)).fetchall()
        except sqlite3.DatabaseError:
            return None
    return None if first is None else first / 1000 - since


def summary_table(measurements: list[Measurement]) -> str:
    """The figures of docs/reliability.md: one Markdown column per command."""
    def killed(m):
        return [a for r in m.rounds for a in r.attempts if a.killed]

    def total(m, key):
        return sum(r.checks[key] for r in m.rounds)

    def grid_or_sweep(m, grid_text, sweep_text):
        return grid_text(m) if m.what == "grid" else sweep_text(m)

    rows = [
        ("SIGKILLs of the process group", lambda m: str(m.kills)),
        ("kill moments, s after the start", lambda m: ", ".join(
            f"{a.kill_at_s:.1f}" for a in killed(m))),
        ("kills that left a cell's run / a trial RUNNING", lambda m: str(sum(
            1 for a in killed(m) if a.after.get("interrupted")))),
        ("rounds (fresh stores), starts in all", lambda m: f"{len(m.rounds)}, "
         f"{sum(len(r.attempts) for r in m.rounds)}"),
        ("cells / trials per round", lambda m: grid_or_sweep(
            m, lambda m: f"{m.rounds[0].checks['cells']} cells",
            lambda m: f"{m.rounds[0].checks['budget']} trials "
                      f"({len(m.rounds[0].checks['studies'])} studies)")),
        ("at the end of each round", lambda m: grid_or_sweep(
            m, lambda m: "; ".join(", ".join(f"{c} cells with {n} FINISHED run"
                                             for n, c in r.checks["finished_per_cell"])
                                   for r in m.rounds),
            lambda m: "; ".join(f"{r.checks['trials']} trials finished, each point once: "
                                f"{r.checks['each_point_once']}" for r in m.rounds))),
        ("RUNNING (or WAITING) left", lambda m: str(total(
            m, "running_runs" if m.what == "grid" else "running"))),
        ("killed runs / trials recovered", lambda m: grid_or_sweep(
            m, lambda m: f"{total(m, 'killed_runs')} runs KILLED, {total(m, 'resumed_runs')} "
                         "resumed from a checkpoint",
            lambda m: f"{total(m, 'failed_trials')} trials FAIL, {total(m, 'retried_trials')} "
                      "retried at their parameters")),
        ("max difference to the uninterrupted run", lambda m: grid_or_sweep(
            m, lambda m: f"{max(r.checks['max_metric_difference'] for r in m.rounds):g} "
                         "(final metrics); loss histories equal: "
                         f"{all(r.checks['loss_histories_equal'] for r in m.rounds)}",
            lambda m: f"{max(r.checks['max_value_difference'] for r in m.rounds):g} (trial "
                      "values); best values equal: "
                      f"{all(r.checks['best_values_equal'] for r in m.rounds)}")),
        ("wall time: uninterrupted, whole measurement", lambda m: f"{m.reference_wall_s:.0f} s, "
         f"{m.total_wall_s:.0f} s"),
        ("passed", lambda m: str(m.passed)),
    ]
    lines = ["| | " + " | ".join(f"`gatelab {m.what}`" + (f", {m.label}" if m.label else "")
                                 for m in measurements) + " |",
             "|---|" + "---|" * len(measurements)]
    lines += [f"| {label} | " + " | ".join(cell(m) for m in measurements) + " |"
              for label, cell in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs per command (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments")
    parser.add_argument("--what", default="grid,sweep", help="grid, sweep or grid,sweep")
    parser.add_argument("--workers", type=int, default=2,
                        help="CPU workers of the grid and the sweep (default 2)")
    parser.add_argument("--window", type=float, default=0.5,
                        help="kill moments are uniform over [0, s + this x (1 - p) x W]: W "
                             "the uninterrupted run's training time, s the start-up, p the "
                             "fraction of the work done (default 0.5; see measure())")
    parser.add_argument("--storage", default="journal", choices=("journal", "sqlite"),
                        help="the sweep's Optuna storage (default journal)")
    parser.add_argument("--workdir", help="keep the stores here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="gatelab-kill-resume-"))
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # reading loss histories
    cases = {"grid": GridCase(args.workers), "sweep": SweepCase(args.workers, args.storage)}
    wanted = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in cases]
    if unknown or not wanted:
        parser.error(f"--what: expected grid, sweep or grid,sweep, got {args.what!r}")
    measurements = [measure(cases[w], root, args.kills, args.seed, args.window,
                            say=lambda line: print(line, flush=True)) for w in wanted]
    print(summary_table(measurements))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{**asdict(m), "kills": m.kills, "passed": m.passed} for m in measurements],
            indent=2, default=str))
    if args.workdir:
        print(f"stores kept under {root}")
    return 0 if all(m.passed for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
