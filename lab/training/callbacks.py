"""Callbacks: the cross-cutting parts of a run, kept out of the training step.

`LossMonitor` keeps every step's loss on the device and copies them to the host once per
logging interval (one synchronisation per interval, not per step); from that history it
logs throughput, stops diverged runs and, at the end, finds loss spikes.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from lab.analysis.metrics import analyze
from lab.config import RunConfig
from lab.model.flops import peak_tflops
from lab.model.moe import moe_layers, routing_summary
from lab.progress import configure_output
from lab.records import finite_metrics
from lab.training.spikes import detect_spikes

configure_output()  # Lightning set its loggers to INFO when imported (lab/progress.py)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_peak_tflops() -> float | None:
    """This machine's GPU's dense bf16 peak, TFLOP/s, for MFU: the lab's entry where it has
    one (lab/model/flops.py: GPUs Lightning's table lacks or quotes otherwise), else
    Lightning's (get_available_flops); None without a GPU, or for one neither knows."""
    if not torch.cuda.is_available():
        return None
    listed = peak_tflops(torch.cuda.get_device_name())
    if listed is not None:
        return listed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning for an unknown GPU: None says as much
        flops = get_available_flops(torch.device("cuda"), torch.bfloat16)
    return flops / 1e12 if flops else None


class LossMonitor(L.Callback):
    """Also the run's throughput, measured as torchtitan logs it: `throughput/tokens_per_s`
    per logging interval over training steps only. The clock starts at the end of the
    first optimizer step (compilation and warm-up fall in `time/first_step_s`), and the time
    spent in validation and in checkpoint writes (`exclude`) is taken out of the interval.
    The intervals end at the flush's own synchronisation, so the clock reads finished GPU
    work; validation is bracketed by two more (once per validation, not per step)."""

    def __init__(self, config: RunConfig, accumulate: int = 1, flops_per_token: float | None = None,
                 peak_tflops: float | None = None):
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
        self.tokens_per_s: list[float] = []
        self.accumulate = accumulate
        self.val_losses: list[float] = []
        self._micro = 0
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        # Steady-state clock: seconds and steps of training counted so far.
        self.train_seconds, self.train_steps = 0.0, 0
        self.first_step_s: float | None = None
        self._started: float | None = None
        self.fit_started_at: float | None = None
        self._interval: tuple[float, int] | None = None   # (clock, step) the interval began at
        self._excluded = 0.0
        self._validation_started: float | None = None
        self.validation_seconds = 0.0  # periodic validations, for time/validation_s

    def on_fit_start(self, trainer, pl_module):
        self.fit_started_at = time.perf_counter()  # (lab/training/phases.py MODEL_BUILD_PARTS)

    def on_train_start(self, trainer, pl_module):
        self._started = time.perf_counter()
        self._interval = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @property
    def started_at(self) -> float | None:
        """`time.perf_counter()` when this fit's training loop began (on_train_start)."""
        return self._started

    def exclude(self, seconds: float) -> None:
        """Time inside the training loop that is not training (a checkpoint write)."""
        self._excluded += seconds

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and self._interval is not None:
            _sync()
            self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._validation_started is not None:
            _sync()
            seconds = time.perf_counter() - self._validation_started
            self.exclude(seconds)
            self.validation_seconds += seconds
            self._validation_started = None
        if "val/loss" in trainer.callback_metrics and not trainer.sanity_checking:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))

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
        if self._interval is None:  # the first step of this fit: compile and warm-up
            _sync()
            now = time.perf_counter()
            self.first_step_s = now - self._started
            self._interval, self._excluded = (now, trainer.global_step), 0.0
        if len(self._pending) >= self.flush_every:
            self._flush(trainer, pl_module)

    def _flush(self, trainer, pl_module):
        if not self._pending:
            return
        steps = [s for s, _, _ in self._pending]
        # One copy to the host for the interval: the losses and grad norms stacked together.
        nan = torch.full((), math.nan, device=self._pending[0][1].device)
        values = torch.stack([torch.stack([l.float(), nan if n is None else n.float()])
                              for _, l, n in self._pending]).tolist()
        losses, norms = [v[0] for v in values], [v[1] for v in values]
        self._pending.clear()
        self.steps += steps
        self.losses += losses
        self.grad_norms += norms
        now = time.perf_counter()
        metrics = {"train/loss": losses[-1], "train/grad_norm": norms[-1]}
        if trainer.lr_scheduler_configs:
            metrics["lr"] = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
        if self._interval is not None and steps[-1] > self._interval[1]:
            seconds = now - self._interval[0] - self._excluded
            done = steps[-1] - self._interval[1]
            if seconds > 0:
                rate = done * self.tokens_per_step / seconds
                self.tokens_per_s.append(rate)
                self.train_seconds += seconds
                self.train_steps += done
                metrics["throughput/tokens_per_s"] = rate
                if self.flops_per_token and self.peak_tflops:
                    metrics["throughput/mfu"] = self.mfu(rate)
            self._interval, self._excluded = (now, steps[-1]), 0.0
        if trainer.is_global_zero and trainer.logger is not None:
            # In the background where the logger can (lab/training/run.py RunLogger): the
            # .tolist() above has just emptied the GPU's queue, so a blocking store write
            # here would leave the GPU idle for as long as the write takes.
            write = getattr(trainer.logger, "log_metrics_in_background",
                            trainer.logger.log_metrics)
            write({k: v for k, v in metrics.items() if math.isfinite(v)}, step=steps[-1])
        self._check_divergence(trainer, steps, losses)

    @staticmethod
    def wait_for_writes(trainer) -> None:
        """Every metric written so far is in the store once this returns."""
        wait = getattr(trainer.logger, "wait_for_writes", None)
        if trainer.is_global_zero and wait is not None:
            wait()

    def mfu(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.config.train.devices)

    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s over every steady-state interval of the run (training time only)."""
        if not self.train_seconds:
            return None
        return self.train_steps * self.tokens_per_step / self.train_seconds

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
        # The last background write: where the logger can, its writer is stopped too, so
        # that closing the run does not wait for it (lab/training/run.py RunLogger).
        end = getattr(trainer.logger, "end_background_writes", None)
        if trainer.is_global_zero and end is not None:
            end()
        else:
            self.wait_for_writes(trainer)

    def on_exception(self, trainer, pl_module, exception):
        # A stop signal or a failure: what was written reaches the store before train_run
        # closes the run; a write that failed too is reported, not raised over `exception`.
        try:
            self.wait_for_writes(trainer)
        except Exception as err:
            warnings.warn(f"metrics of the last interval may be missing from the store: "
                          f"{type(err).__name__}: {err}")

    def state_dict(self) -> dict:
        # The history travels in the checkpoint, so a run resumed after a crash reports
        # spikes and loss_history.json over the whole run, not only after the resume.
        pending = [(s, float(l), math.nan if n is None else float(n)) for s, l, n in self._pending]
        return {"steps": self.steps + [p[0] for p in pending],
                "losses": self.losses + [p[1] for p in pending],
                "grad_norms": self.grad_norms + [p[2] for p in pending],
                "tokens_per_s": list(self.tokens_per_s), "val_losses": list(self.val_losses)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = list(state_dict["steps"])
        self.losses = list(state_dict["losses"])
        self.grad_norms = list(state_dict["grad_norms"])
        self.tokens_per_s = list(state_dict["tokens_per_s"])
        self.val_losses = list(state_dict.get("val_losses", []))

    def spikes(self):
        t = self.config.train
        return detect_spikes(self.losses, self.steps, t.spike_window, t.spike_k, t.spike_floor,
                             t.spike_merge)


class FirstStepNotice(L.Callback):
    """Calls `notify()` once, after the run's first optimizer step, when its model has been
    compiled: a grid started with --warm-first holds the other cells of the same compiled
    shape until then (lab/experiments/pool.py WorkerPool.run)."""

    def __init__(self, notify):
        self.notify, self.done = notify, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.done:
            self.done = True
            self.notify()


class GateInsertion(L.Callback):
    """`sdpa_gate_added_in_continued_training` (NeurIPS App. A.7): the model trains as the
    baseline until `gate_insert_fraction` of the steps, then the gate switches on and
    training continues on the same schedule. Its parameters get no gradient before that;
    the gate's columns of the fused in_proj still see AdamW's decoupled weight decay, so
    they enter slightly shrunk from their init (a factor of about exp(-wd x sum of LRs))."""

    def __init__(self, insert_step: int):
        self.insert_step = insert_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        active = trainer.global_step >= self.insert_step
        pl_module.model.set_gate_active(active)


class AtomicCheckpoint(L.Callback):
    """`last.ckpt` every `every` steps (no sooner than `min_interval_s` after the last one),
    and at the end; written to a temporary file and renamed, so a kill
    mid-write leaves the previous checkpoint intact; never written once the loss is
    non-finite (a diverged run keeps its last good weights). A temporary file that a failed
    write leaves (a full disk) is removed at once, one that a kill left when the run
    starts again."""

    def __init__(self, directory: Path, every: int, loss_monitor: LossMonitor,
                 min_interval_s: float = 0.0):
        self.path = Path(directory) / "last.ckpt"
        self.every, self.loss_monitor = every, loss_monitor
        self.min_interval_s = min_interval_s
        self._saved_at = time.monotonic()  # the run's start counts as the last save
        self.seconds = 0.0  # every write of this run, for time/checkpoint_s

    @property
    def partial_path(self) -> Path:
        return self.path.with_suffix(".tmp")

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.partial_path.unlink(missing_ok=True)  # a killed attempt's unfinished write

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        due = time.monotonic() - self._saved_at >= self.min_interval_s
        if step and step % self.every == 0 and due and getattr(self, "_saved_step", None) != step:
            self._saved_step = step
            self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        # The final weights, for `gatelab analyze` (and a resume that finds nothing left to do).
        if getattr(self, "_saved_step", None) != trainer.global_step:
            self._saved_step = trainer.global_step
            self.save(trainer)

    def save(self, trainer) -> None:
        if self.loss_monitor.diverged_step is not None:
            return
        if not all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters()):
            return
        _sync()  # the steps queued before the write count as training, not as the write
        started = time.perf_counter()
        # A resume starts after this step: every metric up to it must be in the store first.
        self.loss_monitor.wait_for_writes(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.partial_path
        try:
            # weights_only=False here means the whole training state (optimizer, loops,
            # callbacks), for resuming; it is still only tensors and plain data.
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                os.replace(tmp, self.path)
        except BaseException:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
            raise
        self._saved_at = time.monotonic()
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.loss_monitor.exclude(seconds)  # not training time


class RoutingStats(L.Callback):
    """Routing statistics of every MoE run, kept off the hot path: each micro-batch's
    per-expert counts and unweighted router losses stay on the device and are summed; once
    per `log_every` optimizer steps they are copied to the host (one sync) and logged as
    `moe/load_max_over_mean`, `moe/load_min_over_mean` (worst layer over the interval),
    `moe/aux_loss` (load-balancing loss, mean over layers, 1 = uniform router) and
    `moe/z_loss`. At the end, `routing.json` records each layer's per-expert share of all
    assignments of the run. Under DDP the counts are rank 0's (the losses use global ones)."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.run_counts: torch.Tensor | None = None
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._counts, self._losses, self._micro_batches = None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = [layer for layer in moe_layers(pl_module) if layer.routing]
        if not layers:
            return
        counts = torch.stack([layer.routing["counts"] for layer in layers]).float()  # (layers, E)
        losses = torch.stack([torch.stack([layer.routing["balance_loss"], layer.routing["z_loss"]])
                              for layer in layers]).mean(dim=0)  # (2,)
        self._counts = counts if self._counts is None else self._counts + counts
        self._losses = losses if self._losses is None else self._losses + losses
        self._micro_batches += 1
        self.run_counts = counts if self.run_counts is None else self.run_counts + counts
        steps_done = trainer.global_step
        if steps_done and steps_done % self.log_every == 0 and steps_done != getattr(
                self, "_logged_step", None):
            self._logged_step = steps_done
            self._flush(trainer)

    def _flush(self, trainer) -> None:
        if self._counts is None:
            return
        summary = routing_summary(self._counts)
        values = torch.stack([summary["load_max_over_mean"], summary["load_min_over_mean"],
                              *(self._losses / self._micro_batches)]).tolist()  # one sync
        self._reset_interval()
        if trainer.is_global_zero and trainer.logger is not None:
            names = ("moe/load_max_over_mean", "moe/load_min_over_mean", "moe/aux_loss",
                     "moe/z_loss")
            trainer.logger.log_metrics(dict(zip(names, values)), step=trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self._flush(trainer)
        logger = trainer.logger
        if self.run_counts is None or not trainer.is_global_zero or \
                not hasattr(logger, "run_id"):
            return
        counts = self.run_counts.cpu()
        share = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)
        logger.experiment.log_dict(logger.run_id,
                                   {"experts": counts.shape[-1],
                                    "top_k": moe_layers(pl_module)[0].top_k,
                                    "token_fraction_per_layer": share.tolist(),
                                    "assignments_per_layer": counts.tolist()}, "routing.json")
class AnalysisMonitor(L.Callback):
    """`train.analysis_every` > 0: the probe metrics of lab/analysis/metrics.py (attention sink,
    massive activations, gate statistics) every N steps, as time series on the run.
    Long-context perplexity and plots are left to the end of the run (lab/training/run.py).
    Its time is kept out of the loss monitor's training time, as a checkpoint's is (the
    sink grid measures every 500 steps: that time was counted as training steps before),
    and summed in `seconds` (time/periodic_analysis_s)."""

    def __init__(self, store, config: RunConfig, loss_monitor: LossMonitor | None = None):
        self.store, self.config = store, config
        self.every = config.train.analysis_every
        self.loss_monitor = loss_monitor
        self.seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not step or step % self.every or getattr(self, "_done_step", None) == step:
            return
        self._done_step = step
        if not trainer.is_global_zero or trainer.logger is None:
            return
        _sync()  # the steps queued before count as training, not as the analysis
        started = time.perf_counter()
        result = analyze(pl_module.model, self.store, self.config, factors=(), maps=False)
        if result.skipped is None:
            trainer.logger.log_metrics(finite_metrics(result.metrics), step=step)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        if self.loss_monitor is not None:
            self.loss_monitor.exclude(seconds)
