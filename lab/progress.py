"""Terminal progress for grids: a grid-level bar (cells done, ETA) and per-run lines.

Lines, not redrawn bars: several worker processes print to one terminal, and a log file
of a grid should read the same as the terminal did. Quiet mode prints neither.
"""

from __future__ import annotations

import time

import lightning as L

from lab.callbacks import LossMonitor


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

    def bar(self, width: int = 24) -> str:
        finished = self.already_done + self.done
        all_cells = self.already_done + self.total
        filled = int(width * finished / max(1, all_cells))
        elapsed = time.time() - self.started
        eta = "?"
        if self.done:
            remaining = self.total - self.done
            eta = duration(elapsed / self.done * remaining / min(self.workers, max(1, remaining))
                           if remaining else 0)
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"[{'#' * filled}{'-' * (width - filled)}] {finished}/{all_cells} cells"
                f"{failed} | {duration(elapsed)} elapsed | ETA {eta}")

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"grid {self.name}: {text}", flush=True)

    def cell_done(self, name: str, outcome_text: str, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        self.say(f"{self.bar()}\n    {name}: {outcome_text}")


class RunProgress(L.Callback):
    """One line per reporting interval: step, training loss and tokens/s of the run.

    The interval is the larger of train.log_every and a tenth of the run, so a run prints
    about ten lines whatever its length."""

    def __init__(self, label: str, total_steps: int, log_every: int, tokens_per_step: int):
        self.label, self.total_steps = label, total_steps
        self.every = max(log_every, total_steps // 10, 1)
        self.tokens_per_step = tokens_per_step
        self._last = None

    def on_train_start(self, trainer, pl_module):
        self._last = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or self._last is None or step == self._last[1]:
            return
        now = time.perf_counter()
        tokens_per_s = (step - self._last[1]) * self.tokens_per_step / max(now - self._last[0], 1e-9)
        self._last = (now, step)
        monitors = [c for c in trainer.callbacks if isinstance(c, LossMonitor)]
        losses = monitors[0].losses if monitors else []
        loss_text = f"{losses[-1]:.4f}" if losses else "?"
        print(f"    [{self.label}] step {step}/{self.total_steps}  loss {loss_text}  "
              f"{tokens_per_s:,.0f} tokens/s", flush=True)
