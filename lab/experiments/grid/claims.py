"""What each cell needs from the store, and the claim that makes one process train it.

Resume. A rerun skips cells that have a FINISHED child run with the same config_hash. A
child run still RUNNING is alive only if its owner is: each run carries the tag
`gatelab.owner` = `host:pid:start`, the process that executes it (its start time from
/proc guards against a reused pid). On the owner's host the run is dead when that process
is gone; from another host it is dead when its `gatelab.heartbeat` tag (refreshed every
HEARTBEAT_S by the worker, lab.records.heartbeat) is older than `stale_after_s`. Dead runs
are marked KILLED and their cell continues in the same run from its last checkpoint
(`train_run(run_id=...)`), so a cell ends with exactly one FINISHED run; a killed run
without a checkpoint stays KILLED and the cell starts a fresh run.

One claim per cell. Any number of grid processes (shards, a second invocation) may work on
one store, so before a cell trains it is claimed: the parameter
`gatelab.claim/<config_hash>/<attempt>` = `<owner>@<unix time>` logged on the grid's parent
run. MLflow refuses to change a logged parameter (in one database transaction), so of two
processes claiming the same attempt exactly one succeeds; the other reads the holder and
leaves the cell to it while the holder lives (owner_alive; for another host the newer of the
claim's time and its run's heartbeat counts), or claims the next attempt once the holder is
dead. The winner then reads the store again, so a cell FINISHED in the meantime is not
trained twice.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from lab import records
from lab.config import RunConfig
from lab.errors import LabError
from lab.experiments.grid.spec import Cell
from lab.records import (CLAIM_PARAM, CONFIG_HASH_TAG, HEARTBEAT_TAG, STALE_AFTER_S, CellRecord,
                         checkpoint_dir, kill_dead_run, load_checkpoint, owner_alive,
                         run_owner_alive)


# --- the store ------------------------------------------------------------------------

@dataclass
class Task:
    index: int
    name: str
    config: RunConfig
    run_id: str | None = None      # an existing run to continue (resume, or pre-created)
    resumed: bool = False
    claim: str | None = None       # <config_hash>/<attempt> this process holds (claim_cell)


@dataclass
class Plan:
    tasks: list[Task]
    done: list[Cell]
    busy: list[Cell]
    killed: list[str]


def reconcile(client, cells: list[Cell], runs: list, stale_after_s: float = STALE_AFTER_S) -> Plan:
    """What each cell needs: nothing (a FINISHED run), nothing now (a live RUNNING run), a
    resume (a dead run with a checkpoint), or a fresh run. Dead RUNNING runs become KILLED.
    A checkpoint to resume from is read here (its plain data only, lab.records.load_checkpoint):
    one that is refused stops the grid with one line before anything trains."""
    by_hash: dict[str | None, list[CellRecord]] = {}
    for record in map(CellRecord.from_run, runs):
        by_hash.setdefault(record.config_hash, []).append(record)
    tasks, done, busy, killed = [], [], [], []
    for index, cell in enumerate(cells):
        mine = sorted(by_hash.get(cell.config_hash, []), key=lambda r: r.start_time)
        if any(r.finished for r in mine):
            done.append(cell)
            continue
        live = False
        for record in mine:
            if record.status != "RUNNING":
                continue
            if run_owner_alive(record.run, stale_after_s):
                live = True
                continue
            kill_dead_run(client, record.run, "the grid resumed")
            killed.append(record.run_id)
        if live:
            busy.append(cell)
            continue
        resumable = [r for r in mine if (r.status == "KILLED" or r.run_id in killed)
                     and (checkpoint_dir(r.run_id) / "last.ckpt").exists()]
        if resumable:
            run_id = resumable[-1].run_id
            path = checkpoint_dir(run_id) / "last.ckpt"
            try:
                load_checkpoint(path, "grid", mmap=True)
            except LabError as err:
                raise LabError(f"{err}; remove it (rm {path}) to run {cell.name} from the "
                               "start") from None
            tasks.append(Task(index, cell.name, cell.config, run_id, True))
        else:
            tasks.append(Task(index, cell.name, cell.config))
    return Plan(tasks, done, busy, killed)


@dataclass(frozen=True)
class GridContext:
    uri: str
    experiment: str
    parent_run_id: str
    grid: str
    quiet: bool
    stale_after_s: float = STALE_AFTER_S
    runs_per_gpu: int = 0  # cells sharing each GPU (0: CPU workers, or a DDP cell's GPUs)
    check_share_s: float = 0.0  # this start's `gatelab check` over the cells it starts


def cell_runs(client, ctx: GridContext, config_hash: str) -> list:
    experiment_id = client.get_run(ctx.parent_run_id).info.experiment_id
    return records.search_all(client, experiment_id,
                               f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and "
                               f"tags.{CONFIG_HASH_TAG} = '{config_hash}'")


def _claim_alive(holder: str, runs: list, stale_after_s: float) -> bool:
    """Whether the process that holds a claim (`owner@time`) may still be training the cell:
    on this host, whether it exists; from another host, whether the claim or the cell's
    running run has been refreshed within stale_after_s (lab.records.owners.owner_alive)."""
    owner, _, claimed_at = holder.rpartition("@")
    beats = [claimed_at] + [r.data.tags.get(HEARTBEAT_TAG) for r in runs
                            if r.info.status == "RUNNING"]
    times = []
    for beat in beats:
        try:
            times.append(float(beat))
        except (TypeError, ValueError):
            continue
    return owner_alive(owner, str(max(times)) if times else None, stale_after_s)


def claim_cell(task: Task, ctx: GridContext, owner: str) -> tuple[Task | None, str]:
    """Claim the task's cell for `owner` (see the module's docstring) -> (the task to run, as
    the store now says: fresh, or resuming a dead run, with its claim; "") or (None, why the
    cell is left to another process)."""
    client = records.client(ctx.uri)
    config_hash = task.config.hash()
    prefix = f"{CLAIM_PARAM}/{config_hash}/"
    while True:
        params = client.get_run(ctx.parent_run_id).data.params
        attempts = sorted(int(key[len(prefix):]) for key in params
                          if key.startswith(prefix) and key[len(prefix):].isdigit())
        runs = cell_runs(client, ctx, config_hash)
        if any(r.info.status == "FINISHED" for r in runs):
            return None, "FINISHED by another process"
        if attempts:
            holder = params[f"{prefix}{attempts[-1]}"]
            if holder.rpartition("@")[0] == owner:  # an earlier call of this same process
                claim = f"{config_hash}/{attempts[-1]}"
                break
            if _claim_alive(holder, runs, ctx.stale_after_s):
                return None, f"claimed by {holder.rpartition('@')[0]}, which is alive"
        attempt = (attempts[-1] if attempts else 0) + 1
        key = f"{prefix}{attempt}"
        try:
            client.log_param(ctx.parent_run_id, key, f"{owner}@{int(time.time())}")
        except MlflowException:
            if key not in client.get_run(ctx.parent_run_id).data.params:
                raise  # not a lost race: the store refused the write
            continue  # another process claimed this attempt first: look again
        claim = f"{config_hash}/{attempt}"
        break
    # Held: what the cell needs is read again, after the claim (a run may have FINISHED or
    # died since this grid planned).
    now = reconcile(client, [Cell.of(task.config)], cell_runs(client, ctx, config_hash), ctx.stale_after_s)
    if now.done:
        return None, "FINISHED by another process"
    if now.busy:
        return None, "running in another live process"
    fresh = now.tasks[0]
    return dataclasses.replace(task, run_id=fresh.run_id, resumed=fresh.resumed,
                               claim=claim), ""
