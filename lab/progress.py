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
lines (step, loss, tokens/s, ETA); a grid prints one line per finished cell with its ETA
(`GridProgress`); a sweep one line per finished trial.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import lightning as L

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
    to INFO when imported, so it is imported first (at module import); MLflow reads its
    level from the environment when imported, so that is set too; Optuna's is set when
    Optuna is loaded (lab/experiments/sweep.py calls this again once it has imported it)."""
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


class RunProgress(L.Callback):
    """Lines of one run: `[label] step 40/97  loss 3.2100  12,345 tokens/s  ETA 20s`.

    A line when the run crosses each tenth of its steps, at most one every
    `min_interval_s` (every tenth at --verbose), so a short run prints nothing until it
    ends and a long one about ten lines."""

    def __init__(self, label: str, total_steps: int, tokens_per_step: int,
                 min_interval_s: float = 30.0):
        self.label, self.total_steps = label, total_steps
        self.every = max(total_steps // 10, 1)
        self.tokens_per_step = tokens_per_step
        self.min_interval_s = 0.0 if verbosity() == "verbose" else min_interval_s
        self._start = self._printed = None

    def on_train_start(self, trainer, pl_module):
        self._start = self._printed = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self._start is None or step % self.every or step == self._printed[1]:
            return
        now = time.perf_counter()
        if now - self._printed[0] < self.min_interval_s:
            return
        rate = (step - self._start[1]) / max(now - self._start[0], 1e-9)  # steps/s since start
        self._printed = (now, step)
        # The loss of this batch (the step's last micro-batch): one host copy per line.
        loss = outputs.get("lm_loss") if isinstance(outputs, dict) else None
        loss_text = f"{float(loss):.4f}" if loss is not None else "?"
        print(f"    [{self.label}] step {step}/{self.total_steps}  loss {loss_text}  "
              f"{rate * self.tokens_per_step:,.0f} tokens/s  "
              f"ETA {duration((self.total_steps - step) / max(rate, 1e-9))}", flush=True)
