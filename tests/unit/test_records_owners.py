"""lab/records/owners.py: who owns resumable work and whether that owner still lives
(how worker processes split the host's cores: tests/integration/test_pool.py).

tests/integration/test_grid.py `test_owner_liveness` covers the plain cases (this process alive, an exited
child dead, a reused pid, a fresh and a stale remote heartbeat); here the rest of the rules."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.records import owners
from lab.records.owners import STALE_AFTER_S, is_local, owner_alive, owner_identity

HOST = socket.gethostname()


def pid_that_never_ran() -> int:
    """A pid above the kernel's largest, which no process can have (Linux's limit; elsewhere
    the largest pid_t, above any real system's)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2 ** 31 - 1


linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                           reason="process start times come from /proc (Linux)")


# --- identity ---------------------------------------------------------------------------

@linux
def test_identity_is_host_pid_and_start_time_and_tells_processes_apart():
    host, pid, start = owner_identity().rsplit(":", 2)
    assert (host, int(pid)) == (HOST, os.getpid()) and start.isdigit()
    assert owner_identity() == owner_identity(os.getpid())  # stable for one process
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        child_host, child_pid, child_start = owner_identity(child.pid).rsplit(":", 2)
        assert (child_host, int(child_pid)) == (HOST, child.pid)
        assert int(child_start) >= int(start)  # started after this process, in clock ticks
    finally:
        child.kill()
        child.wait()


def test_a_process_that_does_not_exist_has_no_start_time():
    assert owner_identity(pid_that_never_ran()) == f"{HOST}:{pid_that_never_ran()}:"


# --- liveness ---------------------------------------------------------------------------

@pytest.mark.parametrize("owner", ["", None, "justahost", "host:12", "host:pid:123",
                                   f"{HOST}:-5:1"])
def test_a_malformed_owner_is_not_alive(owner):
    assert not owner_alive(owner, str(time.time()))


def test_a_local_owner_without_a_start_time_is_alive_while_its_pid_exists():
    """Identities from where no start time could be read (`host:pid:`) fall back to the pid."""
    assert owner_alive(f"{HOST}:{os.getpid()}:", None)
    assert not owner_alive(f"{HOST}:{pid_that_never_ran()}:", None)


def test_a_local_owner_is_judged_by_its_process_not_its_heartbeat():
    fresh, stale = str(time.time()), str(time.time() - 10 * STALE_AFTER_S)
    assert owner_alive(owner_identity(), stale)
    assert not owner_alive(f"{HOST}:{pid_that_never_ran()}:", fresh)


def test_a_process_of_another_user_still_counts_as_alive(monkeypatch):
    """Signal 0 to another user's process is refused, but the process exists."""
    def refused(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(owners.os, "kill", refused)
    assert owner_alive(f"{HOST}:{os.getpid()}:", None)


def test_a_remote_owner_lives_exactly_as_long_as_its_heartbeat_is_younger_than_the_limit():
    remote = "elsewhere.invalid:123:456"
    now = 1_000_000.0
    assert owner_alive(remote, str(now - 59.9), stale_after_s=60, now=now)
    assert not owner_alive(remote, str(now - 60), stale_after_s=60, now=now)
    assert owner_alive(remote, str(now + 5), stale_after_s=60, now=now)  # clocks a little apart
    assert owner_alive(remote, str(time.time()))  # `now` defaults to the clock
    assert not owner_alive(remote, str(time.time() - STALE_AFTER_S - 1))  # default limit


@pytest.mark.parametrize("heartbeat", [None, "", "yesterday"])
def test_a_remote_owner_without_a_readable_heartbeat_is_dead(heartbeat):
    assert not owner_alive("elsewhere.invalid:123:456", heartbeat)


def test_a_host_name_with_colons_is_kept_whole():
    owner = f"{HOST}:x:{os.getpid()}:"  # another host, whose name ends in ':x'
    assert not is_local(owner)
    assert owner_alive(owner, str(time.time()))  # judged by heartbeat, as a remote owner
    assert not owner_alive(owner, None)


def test_is_local():
    assert is_local(owner_identity())
    assert not is_local("elsewhere.invalid:1:2")
    assert not is_local(None) and not is_local("")


def test_end_dead_runs_ends_only_the_runs_of_a_dead_owner(store):
    """Issue 40: of an experiment's RUNNING runs, those whose owner is gone end KILLED with
    the reason; a live owner's, an ownerless one (made before runs had owners: nothing tells)
    and a finished one are left as they are."""
    from mlflow.tracking import MlflowClient

    from lab.records import HEARTBEAT_TAG, KILLED_REASON_TAG, OWNER_TAG, end_dead_runs

    client = MlflowClient(store)
    experiment = client.create_experiment("owned")
    dead_owner = f"{HOST}:{pid_that_never_ran()}:"
    runs = {name: client.create_run(experiment, tags=tags).info.run_id for name, tags in {
        "dead": {OWNER_TAG: dead_owner},
        "alive": {OWNER_TAG: owner_identity()},
        "remote-beating": {OWNER_TAG: "elsewhere.invalid:1:1",
                           HEARTBEAT_TAG: str(int(time.time()))},
        "ownerless": {},
        "finished-dead": {OWNER_TAG: dead_owner}}.items()}
    client.set_terminated(runs["finished-dead"], "FINISHED")
    assert end_dead_runs(client, "owned", "the test looked") == [runs["dead"]]
    assert end_dead_runs(client, "no-such-experiment", "the test looked") == []
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "remote-beating": "RUNNING",
                      "ownerless": "RUNNING", "finished-dead": "FINISHED"}
    assert client.get_run(runs["dead"]).data.tags[KILLED_REASON_TAG] == \
        f"owner {dead_owner} was gone when the test looked"
