"""One cell trained: in this process, in a pool worker (`CellPool`), or as a DDP job over
several GPUs (`python -m lab.experiments.grid --run-cell`). Failures are per cell: a run that
fails (CUDA out of memory, a full disk, any error) is marked FAILED with the tag
`gatelab.failure` saying why, and the grid moves on. A diverged run is FINISHED with the tag
`diverged=true` (lab/training/run.py) and is not rerun.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lab import records
from lab.config import from_dict
from lab.experiments.grid.claims import GridContext, Task, claim_cell
from lab.experiments.pool import WorkerPool, die_with_parent, fail_run
from lab.interrupts import interruption, stop_on_signals
from lab.progress import configure_output
from lab.records import (CLAIM_TAG, GRID_TAG, HEARTBEAT_TAG, OWNER_TAG, RESUMED_TAG,
                         RUNS_PER_GPU_TAG, describe_failure, end_run, heartbeat, owner_identity,
                         start_run)
from lab.training import phases as run_phases


@dataclass
class Outcome:
    index: int
    name: str
    status: str                    # FINISHED, FAILED, or SKIPPED (left to another process)
    run_id: str | None = None
    val_ppl: float | None = None
    diverged_step: int | None = None
    wall_s: float = 0.0
    failure: str | None = None
    # Seconds per phase of the cell's run (lab/training/phases.py), for the grid's time line.
    phases: dict[str, float] = field(default_factory=dict)
    # A pool worker's cell: its end-of-run analysis, whose plots the grid's process draws
    # (lab/experiments/grid/plots.py); None where they were drawn with the run.
    unplotted: Any = None

    def text(self) -> str:
        if self.status == "SKIPPED":
            return f"left to another process ({self.failure})"
        if self.status != "FINISHED":
            return f"FAILED: {self.failure}"
        if self.diverged_step is not None:
            return f"diverged at step {self.diverged_step} (FINISHED, tagged diverged)"
        return f"val/ppl {self.val_ppl:.3f} in {self.wall_s:.0f} s"


def create_cell_run(task: Task, ctx: GridContext, owner: str) -> str:
    tags = {GRID_TAG: ctx.grid, OWNER_TAG: owner, HEARTBEAT_TAG: str(int(time.time()))}
    if ctx.runs_per_gpu:
        tags[RUNS_PER_GPU_TAG] = str(ctx.runs_per_gpu)
    if task.claim:
        tags[CLAIM_TAG] = task.claim
    return start_run(task.config, ctx.uri, ctx.experiment, task.name, ctx.parent_run_id, tags)


def execute_cell(task: Task, ctx: GridContext, on_start=None, lead_rank: bool = True,
                 on_first_step=None, plots_elsewhere: bool = False) -> Outcome:
    """Run one cell in this process: create (or take over) its run and train it. Any failure
    is recorded on the run and returned; an interrupt propagates (the run ends KILLED).
    `on_first_step()` is called once the run's first step (its compile) is done.
    `plots_elsewhere`: the run's plots are not drawn here; its analysis comes back in the
    outcome (`unplotted`) for the grid's process to draw."""
    # Lightning, here rather than at the top: the grid's own process imports this module to
    # hand cells to its workers, and trains none of them itself unless it runs them in turn
    # (lab/experiments/grid/run.py imports it up front then; lab/training/step.py says why).
    from lab.training.callbacks import FirstStepNotice
    from lab.training.run_progress import RunProgress
    from lab.training.run import train_run

    client = records.client(ctx.uri)
    run_id, holding = task.run_id, False   # holding: the run is this process's to close
    started = time.time()
    claiming = time.perf_counter()
    try:
        if lead_rank and task.claim is None:
            claimed, why = claim_cell(task, ctx, owner_identity())
            if claimed is None:
                return Outcome(task.index, task.name, "SKIPPED", failure=why)
            task, run_id = claimed, claimed.run_id
        holding = lead_rank
        if run_id is None:
            run_id = create_cell_run(task, ctx, owner_identity())
        elif lead_rank:
            client.set_tag(run_id, OWNER_TAG, owner_identity())
            client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
            if task.claim:
                client.set_tag(run_id, CLAIM_TAG, task.claim)
            if task.resumed:
                client.set_tag(run_id, RESUMED_TAG, "true")
        if on_start:
            on_start(run_id)
        config = task.config
        callbacks = [] if ctx.quiet else [RunProgress.for_run(task.name, config)]
        if on_first_step is not None:
            callbacks.append(FirstStepNotice(on_first_step))
        # The claim and the run's creation are the cell's store writes before its run starts.
        before = {"store": time.perf_counter() - claiming, "check_share": ctx.check_share_s}
        handed: list = []
        with heartbeat(client, run_id) if lead_rank else nullcontext():
            result = train_run(config, ctx.uri, ctx.experiment, run_id=run_id, quiet=True,
                               callbacks=callbacks, phases=before,
                               plots_elsewhere=handed.append if plots_elsewhere else None)
        return Outcome(task.index, task.name, "FINISHED", run_id, result.metrics.get("val/ppl"),
                       result.diverged_step, time.time() - started,
                       phases=run_phases.phase_seconds(result.metrics),
                       unplotted=handed[0] if handed else None)
    except KeyboardInterrupt as err:  # a stop signal before train_run took the run over
        if holding and run_id is not None:
            end_run(client, run_id, task.config, err)
        raise
    except Exception as err:
        kind, message = describe_failure(err, task.config)
        if lead_rank:
            try:  # best effort: on a full disk the store may refuse this too
                fail_run(ctx.uri, run_id, kind, message)
            except Exception:
                pass
        _release_memory()
        return Outcome(task.index, task.name, "FAILED", run_id, wall_s=time.time() - started,
                       failure=message)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- worker processes -------------------------------------------------------------------

def run_cell_in_worker(task: Task, ctx: GridContext, notify) -> Outcome:
    """A cell in a pool worker: the pool hears of its run as soon as it exists, and when its
    first step is done (WorkerPool.run's warm-up of a shape); the grid's process draws its
    plots (lab/experiments/grid/plots.py), so the worker's next cell starts without them."""
    return execute_cell(task, ctx, on_start=lambda run_id: notify({"run_id": run_id}),
                        on_first_step=lambda: notify({"warm": True}), plots_elsewhere=True)


class CellPool(WorkerPool):
    """The grid's workers (lab/experiments/pool.py): a cell whose worker died ends FAILED,
    `gatelab.failure_kind=worker_died`, and the grid goes on."""

    job = staticmethod(run_cell_in_worker)
    # The training code, imported as a worker starts (before the grid's check ends), not
    # with its first cell (lab/experiments/grid/run.py _start_pool).
    preload = ("lab.training.run",)

    def crashed(self, task: Task, started: dict, reason: str) -> Outcome:
        fail_run(self.context.uri, started.get("run_id"), "worker_died", reason)
        return Outcome(task.index, task.name, "FAILED", started.get("run_id"), failure=reason)


def run_ddp_cell(task: Task, ctx: GridContext, gpus: list[str]) -> Outcome:
    """A cell with train.devices > 1: one Lightning DDP job over the grid's GPUs, in its own
    process (Lightning starts the other ranks by re-running that process's command line, so
    it must be a command that runs just this cell). The run is created here so every rank
    logs to the same one."""
    claimed, why = claim_cell(task, ctx, owner_identity())
    if claimed is None:
        return Outcome(task.index, task.name, "SKIPPED", failure=why)
    task = claimed
    if task.run_id is None:
        task = dataclasses.replace(task, run_id=create_cell_run(task, ctx, owner_identity()))
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, outcome_file = Path(tmp) / "cell.json", Path(tmp) / "outcome.json"
        spec_file.write_text(json.dumps({"task": {**dataclasses.asdict(task),
                                                  "config": task.config.to_dict()},
                                         "ctx": dataclasses.asdict(ctx)}, default=str))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(gpus),
                   GATELAB_GRID_OWNER=owner_identity())
        job = subprocess.Popen([sys.executable, "-m", "lab.experiments.grid", "--run-cell",
                                str(spec_file), "--outcome", str(outcome_file)], env=env)
        try:
            code = job.wait()
        except KeyboardInterrupt as err:
            # The job's lead rank ends the run KILLED for the same signal (its stop_on_signals).
            job.send_signal(interruption(err).signum)
            job.wait()
            raise
        if outcome_file.exists():
            return Outcome(**json.loads(outcome_file.read_text()))
    reason = f"DDP job exited with code {code} before recording an outcome"
    fail_run(ctx.uri, task.run_id, "worker_died", reason)
    return Outcome(task.index, task.name, "FAILED", task.run_id, failure=reason)


def run_cell_main(argv: list[str]) -> int:
    """`python -m lab.experiments.grid --run-cell SPEC --outcome FILE`: one cell, for DDP jobs."""
    spec = json.loads(Path(argv[argv.index("--run-cell") + 1]).read_text())
    outcome_file = Path(argv[argv.index("--outcome") + 1])
    lead = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    configure_output()
    if os.environ.get("GATELAB_GRID_OWNER"):
        die_with_parent(os.environ["GATELAB_GRID_OWNER"])
    raw = spec["task"]
    task = Task(raw["index"], raw["name"], from_dict(raw["config"]), raw["run_id"], raw["resumed"],
                raw["claim"])
    with stop_on_signals():
        outcome = execute_cell(task, GridContext(**spec["ctx"]), lead_rank=lead)
    if lead:
        tmp = outcome_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(outcome)))
        os.replace(tmp, outcome_file)
    return 0
