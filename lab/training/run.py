"""One training run, end to end: config -> data -> model -> Lightning -> MLflow.

`train_run` is what `gatelab train`, the grid and the sweep all call. The config arrives
validated; the run's MLflow record (lab/records/runs.py) is created before training and
closed after the test evaluation. Once the run exists, every way out of `train_run` closes it
(end_run): FINISHED, FAILED with the reason, or KILLED for a stop signal, so no run is left
RUNNING by a live process. Its checkpoints are read only through lab/records/checkpoints.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Metric

from lab import records
from lab.analysis.metrics import Analysis, analysis_device, analyze
from lab.analysis.outputs import log_analysis
from lab.config import RunConfig
from lab.interrupts import interruption
from lab.model.params import count_params, model_flops_per_token
from lab.records import OWNER_TAG, end_dead_runs, owner_identity
from lab.training import phases as run_phases
from lab.training.corpus import open_data
from lab.training.callbacks import (AnalysisMonitor, AtomicCheckpoint, GateInsertion,
                                    LossMonitor, RoutingStats, device_peak_tflops)
from lab.training.module import LanguageModel, TokenDataModule, graph_trainer_options
from lab.training.preflight import preflight
from lab.training.run_progress import RunProgress
from lab.training.schedule import accumulation, total_steps, warmup_steps
from lab.training.spikes import GRAD_NORM_MAX_AFTER_WARMUP, grad_norm_max_after_warmup
from lab.training.step import use_compile_cache

DDP_RUN_ID = "GATELAB_DDP_RUN_ID"


@dataclass
class RunResult:
    run_id: str
    status: str
    metrics: dict = field(default_factory=dict)
    diverged_step: int | None = None


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger on a run that exists already: the run's status and its
    params are train_run's to write, not the Trainer's.

    The training interval's metrics (LossMonitor) go through `log_metrics_in_background`:
    MLflow's own async logging (`MlflowClient.log_batch(synchronous=False)`, a queue and a
    thread of MLflow's) writes them, so the training loop does not wait for the store. A
    synchronous write there came right after the interval's one host-device synchronisation,
    so the GPU sat idle through every SQLite commit (cProfile of a 420-step tiny run on a
    loaded 2-core CPU machine: its 94 interval writes took 2.4 s of the loop's 5.1 s;
    benchmarks/README.md, "Host time"). `wait_for_writes` is called before each checkpoint,
    at the end of training and when training stops on an exception, so a checkpoint never
    gets ahead of the metrics it would resume after."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._writes: list = []  # MLflow's RunOperations, one per background write

    def log_metrics_in_background(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        batch = [Metric(name, float(value), stamp, step) for name, value in metrics.items()]
        self._writes.append(self.experiment.log_batch(self.run_id, metrics=batch,
                                                      synchronous=False))

    def wait_for_writes(self) -> None:
        """Block until every background write is in the store; raises what a write raised."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.wait()

    def end_background_writes(self) -> threading.Thread | None:
        """At the end of training: every background write waited for, then MLflow's
        async-logging thread told to stop, in a thread of its own. Stopping it waits for that
        thread's next poll of its queue, up to 1 s (mlflow/utils/async_logging/
        async_logging_queue.py, `_queue.get(timeout=1)`), and closing the run
        (`set_terminated`, which stops it first) waited that out after the final evaluation
        and the analysis: 0.6-0.9 s a cell, the largest of a cell's store writes
        (benchmarks/README.md). Stopped here, the wait overlaps them, and the close finds the
        queue stopped. A later background write starts MLflow's thread again (its
        `log_batch_async`), and the close then waits as before. Returns the thread (None
        where the store has no async queue to stop)."""
        self.wait_for_writes()
        store = getattr(getattr(self.experiment, "_tracking_client", None), "store", None)
        stop = getattr(store, "shut_down_async_logging", None)
        if stop is None:
            return None
        thread = threading.Thread(target=stop, name="mlflow-async-logging-stop", daemon=True)
        thread.start()
        return thread

    def finalize(self, status: str = "success") -> None:
        pass  # train_run terminates the run once test metrics and artifacts are in

    def log_hyperparams(self, params) -> None:
        pass  # the resolved config is logged once, flattened, by records.start_run


def lightning_logger(uri: str, run_id: str) -> RunLogger:
    return RunLogger(tracking_uri=uri, run_id=run_id, synchronous=True)


def train_run(config: RunConfig, uri: str | None = None, experiment: str = "gatelab",
              run_name: str | None = None, parent_run_id: str | None = None,
              run_id: str | None = None, extra_tags: dict | None = None, quiet: bool = False,
              callbacks: list | None = None,
              on_start: Callable[[str], None] | None = None,
              stopped_by: tuple[type[BaseException], ...] = (),
              phases: dict[str, float] | None = None,
              plots_elsewhere: Callable[[Analysis], None] | None = None) -> RunResult:
    """Train, evaluate and record one run. `run_id` continues an existing (killed) run from
    its last checkpoint; otherwise a new run is created. An exception of `stopped_by` (the
    sweep's pruning) ends the run KILLED rather than FAILED (end_run). `phases`: seconds of
    the run's phases spent before this call (lab/training/phases.py: a grid cell's claim,
    its share of the check), added to the ones measured here. `plots_elsewhere`: the
    end-of-run analysis is handed to it and its plots are not drawn here (a grid's pool
    worker hands them to the grid's own process: lab/experiments/grid/plots.py)."""
    clock = run_phases.PhaseClock({"startup": run_phases.startup_seconds(), **(phases or {})})
    with clock.phase("store"):  # its first call in a process imports MLflow's schema (~1 s)
        uri = records.tracking_uri(uri)
    preflight(config, "cuda" if torch.cuda.is_available() else "cpu")  # before any record
    with clock.phase("data_open"):
        store, config = open_data(config)
    primary = int(os.environ.get("LOCAL_RANK", "0")) == 0
    with clock.phase("store"):
        if primary:  # a read-only store or a full disk: one line, before the run exists
            records.check_writable(uri, count_params(config)["total"])
        mlflow_client = records.client(uri)  # a new SQLite store's first client makes its tables
    # Under DDP, Lightning starts ranks > 0 by running the same command again; they join
    # the run rank 0 created (passed through the environment) and write nothing to MLflow.
    if not primary:
        run_id = os.environ[DDP_RUN_ID]
    # A run this call makes is this process's: it carries the owner and a heartbeat, by which
    # a later command tells that it died with a SIGKILL (lab/records/owners.py). A single
    # run first ends the experiment's runs such a death left RUNNING, as a grid's rerun does.
    owned = primary and run_id is None and OWNER_TAG not in (extra_tags or {})
    if owned:
        extra_tags = {**(extra_tags or {}), OWNER_TAG: owner_identity(),
                      records.HEARTBEAT_TAG: str(int(time.time()))}
        if parent_run_id is None:
            with clock.phase("store"):
                end_dead_runs(mlflow_client, experiment, "another run of the experiment started")
    start_step = 0
    if run_id is not None:
        # A checkpoint that is refused is refused here, before the run is RUNNING again.
        # Only the step is needed (the data order resumes there); mmap reads no tensors.
        ckpt = records.checkpoint_dir(run_id) / "last.ckpt"
        if ckpt.exists():
            with clock.phase("checkpoint"):
                start_step = int(records.load_checkpoint(ckpt, "resume", mmap=True)["global_step"])
    try:
        with clock.phase("store"):
            if primary and run_id is None:
                run_id = records.start_run(config, uri, experiment, run_name, parent_run_id,
                                           extra_tags)
            elif primary:
                mlflow_client.update_run(run_id, status="RUNNING")
        with records.heartbeat(mlflow_client, run_id) if owned else nullcontext():
            return _train(config, store, run_id, uri, mlflow_client, primary, start_step, quiet,
                          callbacks, on_start, clock, plots_elsewhere)
    except BaseException as err:
        if primary and run_id is not None:  # (start_run closes a run it could not finish)
            records.end_run(mlflow_client, run_id, config, err, stopped_by)
        interrupt = interruption(err)
        if interrupt is not None and interrupt is not err:
            raise interrupt from None  # the stop signal, not Lightning's sys.exit(1) for it
        raise


def _train(config: RunConfig, store, run_id: str, uri: str, mlflow_client, primary: bool,
           start_step: int, quiet: bool, callbacks, on_start,
           clock: run_phases.PhaseClock, plots_elsewhere=None) -> RunResult:
    """train_run once its run exists: whatever this raises, train_run closes the run."""
    os.environ[DDP_RUN_ID] = run_id
    if on_start and primary:
        on_start(run_id)
    counts = count_params(config)
    if primary:
        with clock.phase("store"):
            mlflow_client.set_tag(run_id, records.DEVICE_TAG, records.device_name())
            records.log_corpus(mlflow_client, run_id, store)
            for name, value in counts.items():
                mlflow_client.log_metric(run_id, f"params/{name}", value)
    if not quiet and primary:
        added = f", {counts['added']:,} added over baseline"
        active = f", {counts['active']:,} active" if counts["active"] != counts["total"] else ""
        print(f"[{config.variant}] parameters: {counts['total']:,} total{active}, "
              f"{counts['non_embedding']:,} non-embedding{added}", flush=True)

    started = time.time()
    building = time.perf_counter()
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    module = LanguageModel(config)
    ckpt = records.checkpoint_dir(run_id) / "last.ckpt"
    data = TokenDataModule(store, config, start_step=start_step)
    steps = total_steps(config)
    monitor = LossMonitor(config, accumulate=accumulation(config),
                          flops_per_token=model_flops_per_token(config, counts),
                          peak_tflops=device_peak_tflops())
    checkpoints = AtomicCheckpoint(records.checkpoint_dir(run_id),
                                   config.train.checkpoint_every or config.train.val_every, monitor,
                                   # an explicit step cadence is kept as asked
                                   0.0 if config.train.checkpoint_every else
                                   config.train.checkpoint_min_interval_s)
    all_callbacks = [monitor, checkpoints, *(callbacks or [])]
    if not quiet and primary:
        all_callbacks.append(RunProgress.for_run(config.variant, config, min_interval_s=10.0))
    if config.model.gate_insert_fraction is not None:
        all_callbacks.append(GateInsertion(int(config.model.gate_insert_fraction * steps)))
    if config.model.ffn == "moe":
        all_callbacks.append(RoutingStats(config.train.log_every))
    periodic = None
    if config.train.analysis_every and config.train.analysis_windows:
        periodic = AnalysisMonitor(store, config, monitor)
        all_callbacks.append(periodic)
    cuda = torch.cuda.is_available()
    if config.train.compile_on(cuda):
        # named before `fit` starts a DDP run's other ranks, which inherit the environment
        # (lab/training/step.py use_compile_cache)
        use_compile_cache()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=config.train.devices if cuda else 1,
        strategy="ddp" if cuda and config.train.devices > 1 else "auto",
        max_steps=steps, val_check_interval=config.train.val_every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=config.train.log_every,
        logger=lightning_logger(uri, run_id), callbacks=all_callbacks,
        # Progress is the lab's RunProgress lines (lab/training/run_progress.py), not Lightning's bar.
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(records.checkpoint_dir(run_id)),
        **graph_trainer_options(config, cuda))
    built = time.perf_counter()
    # Lightning's own load of the checkpoint, restricted the same way as load_checkpoint.
    with records.system_metrics(run_id, uri, resumed=start_step > 0) if primary else nullcontext():
        fitting = time.perf_counter()
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt.exists() else None,
                    weights_only=True)
    _training_phases(clock, config, monitor, checkpoints, periodic, (building, built, fitting))
    metrics = _finish(trainer, module, data, monitor, config,
                      mlflow_client if primary else None, run_id, started, clock, plots_elsewhere)
    if primary:
        closing = time.perf_counter()
        records.end_run(mlflow_client, run_id, config, None)
        # Closing the run waits for MLflow's async-logging thread to stop (about 1 s, its
        # queue's poll): a store write after the phases were logged, so it is in the
        # returned phases (the grid's line) and not in the logged ones.
        _add_store_seconds(metrics, time.perf_counter() - closing)
    return RunResult(run_id, "FINISHED", metrics, monitor.diverged_step)


def _training_phases(clock, config: RunConfig, monitor: LossMonitor,
                     checkpoints: AtomicCheckpoint, periodic,
                     build_marks: tuple[float, float, float]) -> None:
    """The phases inside `trainer.fit`, from the callbacks' own clocks: the build up to the
    first step (LossMonitor's start) and its parts (`build_marks`: its start, the Trainer
    built, `fit` called), the first step split into compile and one steady step, the steady
    training time, and what validation, checkpoints and the periodic analysis took out of
    it."""
    building, built, fitting = build_marks
    if monitor.started_at is not None:
        clock.add("model_build", monitor.started_at - building)
        fit_started = monitor.fit_started_at or fitting
        for part, seconds in {"construct": built - building, "monitor": fitting - built,
                              "setup": fit_started - fitting,
                              "loop": monitor.started_at - fit_started}.items():
            clock.details[run_phases.model_build_metric(part)] = max(0.0, seconds)
    first = monitor.first_step_s or 0.0
    rate = monitor.steady_tokens_per_s()
    steady_step = monitor.tokens_per_step / rate if rate else first
    compile_s = max(0.0, first - steady_step) if config.train.compile_on(
        torch.cuda.is_available()) else 0.0
    clock.add("compile", compile_s)
    clock.add("train_steps", monitor.train_seconds + first - compile_s)
    clock.add("validation", monitor.validation_seconds)
    clock.add("checkpoint", checkpoints.seconds)
    if periodic is not None:
        clock.add("periodic_analysis", periodic.seconds)


def _finish(trainer, module, data, monitor, config, mlflow_client, run_id, started,
            clock: run_phases.PhaseClock, plots_elsewhere=None) -> dict:
    """Final evaluation (every rank takes part) and the run's summary (`mlflow_client` is None
    on DDP ranks > 0, which record nothing). The run's phases (lab/training/phases.py) are
    logged last, when every phase but the closing of the run has happened."""
    metrics: dict[str, float] = {}
    steps_done = trainer.global_step
    tokens_per_step = config.train.batch_size * config.model.context
    if monitor.diverged_step is not None:
        metrics["diverged/step"] = monitor.diverged_step
    else:
        # Final evaluation at the last step (validation may not fall on it), then test.
        with clock.phase("final_eval"):
            val = trainer.validate(module, datamodule=data, verbose=False)[0]
            test = trainer.test(module, datamodule=data, verbose=False)[0]
        metrics.update({"val/final_loss": val["val/loss"], "val/ppl": val["val/ppl"],
                        "test/loss": test["test/loss"], "test/ppl": test["test/ppl"]})
        metrics["val/best_loss"] = min(monitor.val_losses + [val["val/loss"]])
    spikes = monitor.spikes()
    metrics["spikes/count"] = len(spikes)
    metrics["spikes/max_excess"] = max((s.max_excess for s in spikes), default=0.0)
    metrics["tokens/seen"] = steps_done * tokens_per_step
    metrics["time/wall_s"] = time.time() - started
    metrics.update(throughput_summary(monitor, config))
    if monitor.grad_norms:
        finite = [n for n in monitor.grad_norms if math.isfinite(n)]
        metrics["train/grad_norm_max"] = max(finite, default=float("nan"))
        metrics[GRAD_NORM_MAX_AFTER_WARMUP] = grad_norm_max_after_warmup(
            monitor.steps, monitor.grad_norms,
            warmup_steps(total_steps(config), config.train.warmup_fraction))
    if mlflow_client is None:
        return metrics
    with clock.phase("store"):
        mlflow_client.set_tag(run_id, records.DIVERGED_TAG,
                              str(monitor.diverged_step is not None).lower())
        records.log_metrics(mlflow_client, run_id, metrics, steps_done)
        mlflow_client.log_dict(run_id, [dataclasses.asdict(s) for s in spikes], "spikes.json")
        mlflow_client.log_dict(run_id, {"step": monitor.steps, "loss": monitor.losses,
                                        "grad_norm": monitor.grad_norms}, "loss_history.json")
    if trainer.is_global_zero and (config.train.analysis_windows or config.train.context_factors()):
        analysing = time.perf_counter()
        analysis = _analyze(module, data.store, config, mlflow_client, run_id, steps_done,
                            plots_elsewhere)
        # its own time/analysis_s where it logged one (not when the analysis failed)
        clock.add("analysis", analysis.get("time/analysis_s", time.perf_counter() - analysing))
        metrics.update(analysis)
    # time/compile_s and time/analysis_s are logged above already, from the same clocks.
    timings = {name: value for name, value in clock.metrics().items() if name not in metrics}
    writing = time.perf_counter()
    records.log_metrics(mlflow_client, run_id, timings, steps_done)
    metrics.update(timings)
    # This write comes after the clock was read: in the returned phases, as the closing of
    # the run is (train_run), not in the logged ones.
    _add_store_seconds(metrics, time.perf_counter() - writing)
    return metrics


def _add_store_seconds(metrics: dict[str, float], seconds: float) -> None:
    """A store write after the phases were logged: into the returned store phase and total."""
    for name in (run_phases.metric("store"), run_phases.TOTAL_METRIC):
        metrics[name] = metrics.get(name, 0.0) + seconds


def throughput_summary(monitor, config: RunConfig) -> dict[str, float]:
    """The run's speed as torchtitan reports it: steady-state tokens/s (training steps only:
    no validation, checkpoint or compile time), MFU against the device's looked-up peak,
    peak memory, and the first step's time; with compilation, its cost over a steady step."""
    out: dict[str, float] = {}
    rate = monitor.steady_tokens_per_s()
    if rate:
        out["throughput/tokens_per_s_mean"] = rate
        if monitor.flops_per_token and monitor.peak_tflops:
            out["throughput/mfu"] = monitor.mfu(rate)
    if monitor.first_step_s is not None:
        out["time/first_step_s"] = monitor.first_step_s
        if rate and config.train.compile_on(torch.cuda.is_available()):
            steady_step_s = monitor.tokens_per_step / rate
            out["time/compile_s"] = max(0.0, monitor.first_step_s - steady_step_s)
    if torch.cuda.is_available():
        out["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def _analyze(module, store, config, mlflow_client, run_id, step, plots_elsewhere=None) -> dict:
    """The paper's analyses on the final weights (lab/analysis/metrics.py), also for a diverged run
    whose weights are still finite; timed as `time/analysis_s` (the plots in it unless they
    are drawn elsewhere: train_run's `plots_elsewhere`)."""
    started = time.time()
    device = next(module.model.parameters()).device
    model = module.model.to(analysis_device())  # Lightning's teardown left it on the CPU
    try:
        result = analyze(model, store, config)
        log_analysis(mlflow_client, run_id, result, step, plots=plots_elsewhere is None)
    except Exception as err:  # a finished training run stays FINISHED; the tag says what broke
        traceback.print_exc()
        mlflow_client.set_tag(run_id, records.ANALYSIS_TAG,
                              f"failed: {type(err).__name__}: {err}"[:500])
        return {}
    finally:
        module.model.to(device)
    seconds = time.time() - started
    records.log_metrics(mlflow_client, run_id, {"time/analysis_s": seconds}, step)
    if plots_elsewhere is not None and not result.skipped:
        plots_elsewhere(result)
    return {**result.metrics, "time/analysis_s": seconds}


def describe(result: RunResult) -> str:
    m = result.metrics
    if result.diverged_step is not None:
        return f"run {result.run_id}: diverged at step {result.diverged_step}"
    return (f"run {result.run_id}: val/ppl {m['val/ppl']:.3f}, test/ppl {m['test/ppl']:.3f}, "
            f"{int(m['tokens/seen']):,} tokens in {m['time/wall_s']:.0f} s")


def to_json(result: RunResult) -> str:
    return json.dumps(dataclasses.asdict(result), default=str)
