"""Which process owns a piece of resumable work, and whether it is still alive.

A run or trial records its owner as `host:pid:start`, the start being the process's start
time since boot, so a pid the kernel has reused for another process does not count as the
owner. On the owner's host that is checked directly; from another host only a heartbeat
(a timestamp the owner refreshes) can tell, and it counts as dead after `stale_after_s`.

Every run the lab trains carries its owner (OWNER_TAG) and a heartbeat: a grid's cells, a
sweep's trials and parents, a `gatelab train` run. Each command that makes runs ends the dead
ones it can see before it makes its own (kill_dead_run, end_dead_runs): a SIGKILLed process
cannot close its runs, and without this a `train` or a sweep left them RUNNING for good.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from lab.records.cells import HEARTBEAT_TAG, KILLED_REASON_TAG, OWNER_TAG

# (lab.records.lookup, which loads MLflow, is imported where runs are searched: the pool
# and `gatelab train` import this module before a one-line error, benchmarks/README.md)

STALE_AFTER_S = 600.0


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_identity(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def owner_alive(owner: str | None, heartbeat: str | None, stale_after_s: float = STALE_AFTER_S,
                now: float | None = None) -> bool:
    if not owner:
        return False
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    host, pid, start = parts[0], int(parts[1]), parts[2]
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone else
        return not start or process_start(pid) == start
    try:
        return (now or time.time()) - float(heartbeat) < stale_after_s
    except (TypeError, ValueError):
        return False


def is_local(owner: str | None) -> bool:
    return bool(owner) and owner.rsplit(":", 2)[0] == socket.gethostname()


def run_owner_alive(run, stale_after_s: float = STALE_AFTER_S) -> bool:
    """owner_alive for an MLflow run, by its owner and heartbeat tags."""
    return owner_alive(run.data.tags.get(OWNER_TAG), run.data.tags.get(HEARTBEAT_TAG),
                       stale_after_s)


def kill_dead_run(client, run, when: str) -> None:
    """End a RUNNING run whose owner is gone KILLED, saying whose and `when` it was found."""
    client.set_terminated(run.info.run_id, "KILLED")
    client.set_tag(run.info.run_id, KILLED_REASON_TAG,
                   f"owner {run.data.tags.get(OWNER_TAG)} was gone when {when}")


def end_dead_runs(client, experiment: str, when: str,
                  stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Every RUNNING run of the experiment (by name) that names an owner, and whose owner is
    gone, ends KILLED (kill_dead_run); returns their ids. A run without an owner tag is left
    alone: made before runs carried one, nothing tells whether its process lives."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    from lab.records.lookup import search_all

    dead = [run for run in search_all(client, found.experiment_id,
                                      "attributes.status = 'RUNNING'")
            if run.data.tags.get(OWNER_TAG) and not run_owner_alive(run, stale_after_s)]
    for run in dead:
        kill_dead_run(client, run, when)
    return [run.info.run_id for run in dead]
