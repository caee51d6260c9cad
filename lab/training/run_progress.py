"""The console lines of one run, a Lightning callback (lab/progress.py, which every command
imports, writes the rest of the lab's output without Lightning)."""

from __future__ import annotations

import time

import lightning as L

from lab.config import RunConfig
from lab.progress import configure_output, duration, verbosity
from lab.training.schedule import total_steps

configure_output()  # Lightning set its loggers to INFO when imported (lab/progress.py)


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

    @classmethod
    def for_run(cls, label: str, config: RunConfig,
                min_interval_s: float = 30.0) -> "RunProgress":
        """The lines of a run of `config`: its total steps and tokens per step."""
        return cls(label, total_steps(config), config.train.batch_size * config.model.context,
                   min_interval_s)

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
