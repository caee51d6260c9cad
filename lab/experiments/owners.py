"""Which process owns a piece of resumable work, and whether it is still alive.

A run or trial records its owner as `host:pid:start`, the start being the process's start
time since boot, so a pid the kernel has reused for another process does not count as the
owner. On the owner's host that is checked directly; from another host only a heartbeat
(a timestamp the owner refreshes) can tell, and it counts as dead after `stale_after_s`.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

STALE_AFTER_S = 600.0


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_identity(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


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
        return not start or _process_start(pid) == start
    try:
        return (now or time.time()) - float(heartbeat) < stale_after_s
    except (TypeError, ValueError):
        return False


def is_local(owner: str | None) -> bool:
    return bool(owner) and owner.rsplit(":", 2)[0] == socket.gethostname()
