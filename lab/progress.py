"""Terminal output of every command: three levels, one progress style.

- quiet (`--quiet`): results only, no progress lines;
- normal: the lab's progress lines, and none of the libraries' chatter (Lightning's device
  banners, tips and progress bars, MLflow's schema messages, Optuna's trial log, warnings
  about library internals the user cannot act on);
- verbose (`--verbose`): the lab's lines and everything the libraries say.

The level travels to worker processes in the environment (VERBOSITY_ENV), so a grid's or a
sweep's workers print as the command does.

Progress is lines, not redrawn bars: several worker processes print to one terminal, and
a log file of a grid should read the same as the terminal did. A run prints `RunProgress`
lines (step, loss, tokens/s, ETA: lab/training/run_progress.py); a grid prints one line per
finished cell with its ETA (`GridProgress`); a sweep one line per finished trial.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

# Lightning is not imported here: every command reaches this module, and Lightning took 3-4 s
# of the 4-5 s a one-line error took to print (python -X importtime, benchmarks/README.md).
# The lab's Lightning callback that prints a run's lines is RunProgress in
# lab/training/run_progress.py.

VERBOSITY_ENV = "GATELAB_VERBOSITY"
LEVELS = ("quiet", "normal", "verbose")
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "mlflow", "optuna", "alembic")
# Warnings raised inside the libraries about their own internals (torch's LeafSpec
# deprecation seen from Lightning's _pytree, Lightning's DataLoader worker advice for a data
# path that reads a memmap in the main process): nothing for a lab user to change.
LIBRARY_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r".*does not have many workers"),
)


def verbosity() -> str:
    level = os.environ.get(VERBOSITY_ENV, "normal")
    return level if level in LEVELS else "normal"


def set_verbosity(level: str) -> None:
    """Set the level for this process and the workers it starts, and apply it."""
    os.environ[VERBOSITY_ENV] = level
    configure_output()


def configure_output() -> None:
    """Apply `verbosity()` to the libraries' loggers and warnings. Lightning sets its loggers
    to INFO when imported, so the lab's modules that import it call this again after
    (lab/training/module.py, callbacks.py and run_progress.py); MLflow reads its level from
    the environment when imported, so that is set too; Optuna's is set when Optuna is loaded
    (lab/experiments/sweep/run.py calls this again once it has imported it)."""
    if verbosity() == "verbose":
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if "optuna" in sys.modules:  # Optuna sets its level when it first logs: set it its way
        sys.modules["optuna"].logging.set_verbosity(logging.WARNING)
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module="lightning")


# Tables and lines the commands print fit a terminal this wide (`report`, `variants`, a
# grid's dry run); where a full table is wider, it goes to a file the command names.
TERMINAL_COLUMNS = 120


def clip(line: str, width: int = TERMINAL_COLUMNS) -> str:
    """`line` cut to `width` characters, an ellipsis marking the cut (the full text is in
    the file the command names)."""
    return line if len(line) <= width else line[:width - 1] + "…"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class GridProgress:
    """Cells done out of the cells this invocation has to run, and an ETA from the mean wall
    time of the cells finished so far, divided over the parallel workers."""

    def __init__(self, name: str, total: int, already_done: int, workers: int, quiet: bool):
        self.name, self.total, self.already_done = name, total, already_done
        self.workers, self.quiet = max(1, workers), quiet
        self.done = self.failed = 0
        self.started = time.time()

    def eta(self) -> str:
        if not self.done:
            return "?"
        remaining = self.total - self.done
        elapsed = time.time() - self.started
        return duration(elapsed / self.done * remaining / min(self.workers, max(1, remaining))
                        if remaining else 0)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"grid {self.name}: {text}", flush=True)

    def started_cell(self, text: str) -> None:
        """A cell's start: a line only at --verbose (its RunProgress lines name it)."""
        if verbosity() == "verbose":
            self.say(f"start {text}")

    def cell_done(self, name: str, outcome_text: str, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.quiet:
            return
        finished = self.already_done + self.done
        width = len(str(self.already_done + self.total))
        failed_text = f", {self.failed} failed" if self.failed else ""
        print(f"  [{finished:>{width}}/{self.already_done + self.total}] {name}: {outcome_text}"
              f"  ({duration(time.time() - self.started)} elapsed{failed_text}, "
              f"ETA {self.eta()})", flush=True)
