"""SIGINT and SIGTERM: how `train`, `grid` and `sweep` stop, and the exit code they stop with.

While `stop_on_signals` is in force, both signals raise `Interrupted` in the main thread at
once, wherever it is (a training step, the final evaluation, an MLflow write), so the code
that holds a run ends it KILLED with the signal's name as its reason (lab/run.py), and the
command exits with 128 + the signal's number: 130 for SIGINT (Ctrl-C), 143 for SIGTERM
(what a scheduler sends), the code a shell reports for a process that a signal ended
(docs/reliability.md). A second signal while the runs are being closed is ignored, so an
impatient second Ctrl-C cannot leave a run RUNNING; SIGKILL still ends the process at once
(a rerun then marks its runs KILLED).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_installed = False   # one set of handlers per process: nested uses share it
_stopping = False    # a signal has been turned into Interrupted; later ones are ignored


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


def _raise_interrupted(signum, frame) -> None:
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise Interrupted(signum)


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise Interrupted inside this block (main thread only: Python
    runs signal handlers there); the previous handlers come back after it."""
    global _installed, _stopping
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    _installed, _stopping = True, False
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _installed, _stopping = False, False


def interruption(err: BaseException) -> Interrupted | None:
    """The stop signal behind `err`, if any: Interrupted itself; a plain KeyboardInterrupt
    (SIGINT outside stop_on_signals); Lightning's SIGTERMException (SIGTERM under Lightning's
    own handler); or a SystemExit raised while handling one of those (Lightning's
    `_call_and_handle_interrupt` turns an interrupt during `Trainer.fit` into sys.exit(1))."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, Interrupted):
            return err
        if isinstance(err, SIGTERMException):
            return Interrupted(signal.SIGTERM)
        if isinstance(err, KeyboardInterrupt):
            return Interrupted(signal.SIGINT)
        err = err.__cause__ or err.__context__
    return None
