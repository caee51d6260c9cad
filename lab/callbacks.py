"""Callbacks: the cross-cutting parts of a run, kept out of the training step.

`LossMonitor` keeps every step's loss on the device and copies them to the host once per
logging interval (one synchronisation per interval, not per step); from that history it
logs throughput, stops diverged runs and, at the end, finds loss spikes.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import lightning as L
import torch

from lab.config import RunConfig
from lab.spikes import detect_spikes


class LossMonitor(L.Callback):
    def __init__(self, config: RunConfig, accumulate: int = 1):
        t = config.train
        self.config = config
        self.flush_every = t.log_every
        self.tokens_per_step = t.batch_size * config.model.context
        self.ceiling, self.patience = t.divergence_loss_ceiling, t.divergence_patience
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self.diverged_step: int | None = None
        self._last_time: float | None = None
        self._last_step = 0
        self.tokens_per_s: list[float] = []
        self.accumulate = accumulate
        self._micro = 0

    def on_train_start(self, trainer, pl_module):
        self._last_time = time.perf_counter()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Called per micro-batch: the step's loss is the mean over its micro-batches.
        loss = outputs["lm_loss"].float()
        self._step_loss = loss if self._micro == 0 else self._step_loss + loss
        self._micro += 1
        if self._micro < self.accumulate:
            return
        self._pending.append((trainer.global_step, self._step_loss / self._micro,
                              getattr(pl_module, "grad_norm", None)))
        self._micro = 0
        if len(self._pending) >= self.flush_every:
            self._flush(trainer, pl_module)

    def _flush(self, trainer, pl_module):
        if not self._pending:
            return
        steps = [s for s, _, _ in self._pending]
        losses = torch.stack([l.float() for _, l, _ in self._pending]).tolist()  # one sync
        norms = [float(n) if n is not None else math.nan for _, _, n in self._pending]
        self._pending.clear()
        self.steps += steps
        self.losses += losses
        self.grad_norms += norms
        now = time.perf_counter()
        if self._last_time is not None and steps[-1] > self._last_step:
            rate = (steps[-1] - self._last_step) * self.tokens_per_step / (now - self._last_time)
            self.tokens_per_s.append(rate)
            if trainer.is_global_zero and trainer.logger is not None:
                trainer.logger.log_metrics({"throughput/tokens_per_s": rate}, step=steps[-1])
        self._last_time, self._last_step = now, steps[-1]
        self._check_divergence(trainer, steps, losses)

    def _check_divergence(self, trainer, steps, losses):
        if self.diverged_step is not None:
            return
        for step, loss in zip(steps, losses):
            if not math.isfinite(loss):
                self.diverged_step = step
                break
        recent = self.losses[-self.patience:]
        if self.diverged_step is None and len(recent) == self.patience and \
                min(recent) > self.ceiling:
            self.diverged_step = self.steps[-1]
        if self.diverged_step is not None:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        self._flush(trainer, pl_module)

    def state_dict(self) -> dict:
        # The history travels in the checkpoint, so a run resumed after a crash reports
        # spikes and loss_history.json over the whole run, not only after the resume.
        pending = [(s, float(l), math.nan if n is None else float(n)) for s, l, n in self._pending]
        return {"steps": self.steps + [p[0] for p in pending],
                "losses": self.losses + [p[1] for p in pending],
                "grad_norms": self.grad_norms + [p[2] for p in pending],
                "tokens_per_s": list(self.tokens_per_s)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = list(state_dict["steps"])
        self.losses = list(state_dict["losses"])
        self.grad_norms = list(state_dict["grad_norms"])
        self.tokens_per_s = list(state_dict["tokens_per_s"])

    def spikes(self):
        t = self.config.train
        return detect_spikes(self.losses, self.steps, t.spike_window, t.spike_k, t.spike_floor,
                             t.spike_merge)


class GateInsertion(L.Callback):
    """`sdpa_gate_added_in_continued_training` (NeurIPS App. A.7): the model trains as the
    baseline until `gate_insert_fraction` of the steps, then the gate switches on and
    training continues on the same schedule. Its parameters get no gradient before that."""

    def __init__(self, insert_step: int):
        self.insert_step = insert_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        active = trainer.global_step >= self.insert_step
        pl_module.model.set_gate_active(active)


class AtomicCheckpoint(L.Callback):
    """`last.ckpt` every `every` steps, written to a temporary file and renamed, so a kill
    mid-write leaves the previous checkpoint intact; never written once the loss is
    non-finite (a diverged run keeps its last good weights)."""

    def __init__(self, directory: Path, every: int, loss_monitor: LossMonitor):
        self.path = Path(directory) / "last.ckpt"
        self.every, self.loss_monitor = every, loss_monitor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.every == 0 and getattr(self, "_saved_step", None) != step:
            self._saved_step = step
            self.save(trainer)

    def save(self, trainer) -> None:
        if self.loss_monitor.diverged_step is not None:
            return
        if not all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters()):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
