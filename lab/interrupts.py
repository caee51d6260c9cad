"""SIGINT and SIGTERM: how `train`, `grid` and `sweep` stop, and the exit code they stop with.

While `stop_on_signals` is in force, both signals raise `Interrupted` in the main thread at
once, wherever it is (a training step, the final evaluation, an MLflow write), so the code
that holds a run ends it KILLED with the signal's name as its reason (lab/training/run.py), and the
command exits with 128 + the signal's number: 130 for SIGINT (Ctrl-C), 143 for SIGTERM
(what a scheduler sends), the code a shell reports for a process that a signal ended
(docs/reliability.md). A second signal while the runs are being closed is ignored, so an
impatient second Ctrl-C cannot leave a run RUNNING; SIGKILL still ends the process at once
(a rerun then marks its runs KILLED).

Not inside a database call, though: raised between an INSERT and its COMMIT, the exception
leaves that SQLite write transaction open (its connection held by the traceback), and every
later write of the process, the one that marks the run KILLED included, waits out the busy
timeout and fails. So while the main thread holds a pooled SQLAlchemy connection (MLflow's
and Optuna's SQL stores), a signal is deferred until the connection is back in the pool,
after its transaction was committed or rolled back; at most DEFER_AT_MOST_S.

Before all that, from the first line of `gatelab` (stop_from_the_start, entered by
lab/cli.py main before it imports anything heavy): a signal in the seconds the imports of
torch, Lightning and MLflow take raises Interrupted at once, so the command ends with one
line and 128 + the number, no traceback, before any run exists. SIGINT is caught even when
it was inherited ignored, as a non-interactive shell starts a background job (`gatelab
train ... &` in a script): Python keeps an inherited SIG_IGN, and the lab's promise that
SIGINT stops a run would not hold there. Whether a stop found runs to close is counted
(runs_killed), so the one line says "its run is KILLED" only when one was.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

# SQLAlchemy and Lightning are imported where they are used, not here: `gatelab prepare` and the
# other commands that neither train nor record reach this module from lab/cli.py, and a GPU
# machine's first call may carry the corpus but not the MLflow wheels (docs/reproduce_gpu.sh).

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFER_AT_MOST_S = 5.0  # a database call longer than this is interrupted anyway
_installed = False   # one set of handlers per process: nested uses share it
_stopping = False    # a signal has been turned into Interrupted; later ones are ignored
_connections = 0     # pooled database connections the main thread has checked out
_deferred: int | None = None  # a signal that arrived while one was
_deadline: threading.Timer | None = None
_forced = False      # the database call outlasted DEFER_AT_MOST_S
_seen = False        # a stop signal was taken since stop_from_the_start: later ones ignored
_runs_killed = 0     # runs this process ended KILLED for a stop signal (note_killed)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised where the main thread was. A KeyboardInterrupt, so code that
    already treats Ctrl-C as a stop (Optuna marks the trial FAIL, Lightning tears down its
    loop) treats SIGTERM the same."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _interrupt(signum: int) -> None:
    global _stopping, _deferred, _seen
    _stopping, _deferred, _seen = True, None, True
    if _deadline is not None:
        _deadline.cancel()
    raise Interrupted(signum)


def _on_signal(signum, frame) -> None:
    global _deferred, _deadline
    if _stopping:
        return
    if _forced:
        _interrupt(signum)
    if _deferred is not None:
        return  # already waiting for the database call to end
    if _connections:  # in a database call: raised when it ends (_on_checkin)
        _deferred = signum
        _deadline = threading.Timer(DEFER_AT_MOST_S, _give_up_waiting, (signum,))
        _deadline.daemon = True
        _deadline.start()
        return
    _interrupt(signum)


def _give_up_waiting(signum: int) -> None:
    global _forced
    _forced = True  # the signal sent again raises wherever the main thread is
    os.kill(os.getpid(), signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_checkout(dbapi_connection, connection_record, connection_proxy) -> None:
    global _connections
    if _in_main_thread():
        _connections += 1


def _on_checkin(dbapi_connection, connection_record) -> None:
    """A connection back in the pool (SQLAlchemy resets, i.e. rolls back, before this): a
    deferred signal is raised now, with no transaction left open."""
    global _connections
    if _in_main_thread():
        _connections = max(0, _connections - 1)
        if not _connections and _deferred is not None and not _stopping:
            _interrupt(_deferred)


def _on_early_signal(signum, frame) -> None:
    global _seen
    if _seen:
        return  # the command is already stopping: one signal, one line
    _seen = True
    raise Interrupted(signum)


@contextmanager
def stop_from_the_start():
    """SIGINT and SIGTERM raise Interrupted from here on (the module's docstring says why),
    also where SIGINT was inherited ignored; stop_on_signals takes over inside it. The
    previous handlers come back after it (the CLI's tests call main in one process)."""
    global _seen, _runs_killed
    if not _in_main_thread():
        yield
        return
    _seen, _runs_killed = False, 0
    previous = {signum: signal.signal(signum, _on_early_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def note_killed(count: int = 1) -> None:
    """Runs ended KILLED for a stop signal (lab/records/runs.py end_run, the grid's and the
    sweep's parents): the CLI's line then says so."""
    global _runs_killed
    _runs_killed += count


def runs_killed() -> int:
    return _runs_killed


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise Interrupted inside this block (main thread only: Python
    runs signal handlers there); the previous handlers come back after it."""
    global _installed, _stopping, _connections, _deferred, _deadline, _forced
    if _installed or not _in_main_thread():
        yield
        return
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    # Pool-class listeners reach every pool, also those made before (SQLAlchemy's events).
    event.listen(Pool, "checkout", _on_checkout)
    event.listen(Pool, "checkin", _on_checkin)
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    _installed, _stopping, _connections, _deferred, _deadline, _forced = \
        True, False, 0, None, None, False
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        event.remove(Pool, "checkout", _on_checkout)
        event.remove(Pool, "checkin", _on_checkin)
        if _deadline is not None:
            _deadline.cancel()
        _installed, _stopping, _connections, _deferred, _deadline, _forced = \
            False, False, 0, None, None, False


def interruption(err: BaseException) -> Interrupted | None:
    """The stop signal behind `err`, if any: Interrupted itself; a plain KeyboardInterrupt
    (SIGINT outside stop_on_signals); Lightning's SIGTERMException (SIGTERM under Lightning's
    own handler); or a SystemExit raised while handling one of those (Lightning's
    `_call_and_handle_interrupt` turns an interrupt during `Trainer.fit` into sys.exit(1)).
    Once one is found, the process is stopping: a signal still deferred, or sent again, is
    not raised a second time into the code that closes the runs."""
    global _stopping, _deferred, _seen
    # Only once Lightning is imported can its exception exist: a stop in the first seconds
    # must not wait for (or be interrupted in) the import of Lightning.
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
    sigterm_exception = lightning.SIGTERMException if lightning is not None else ()

    seen, found = set(), None
    while err is not None and id(err) not in seen and found is None:
        seen.add(id(err))
        if isinstance(err, Interrupted):
            found = err
        elif isinstance(err, sigterm_exception):
            found = Interrupted(signal.SIGTERM)
        elif isinstance(err, KeyboardInterrupt):
            found = Interrupted(signal.SIGINT)
        err = err.__cause__ or err.__context__
    if found is not None:
        _seen = True
        if _installed:
            _stopping, _deferred = True, None
    return found
