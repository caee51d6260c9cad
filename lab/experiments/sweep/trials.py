"""One trial = one training run: the objective (`run_trial`) with step-based pruning and the
trial's loss curve as an Optuna artifact, and the pool's trial tasks (`TrialPool`, one
trial at a time per worker).
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import optuna
from lightning.pytorch.trainer.states import TrainerFn
from optuna.artifacts import FileSystemArtifactStore

from lab import records
from lab.experiments.pool import WorkerPool, fail_run
from lab.experiments.sweep.spec import Sweep
from lab.experiments.sweep.storage import open_storage
from lab.experiments.sweep.studies import open_study, trial_runs
from lab.progress import duration
from lab.records import owner_identity
from lab.training.run_progress import RunProgress
from lab.training.run import train_run


def upload_loss_curve(trial, artifacts: FileSystemArtifactStore, mlflow_client,
                      run_id: str) -> None:
    """The trial's loss curve as the Optuna artifact `loss_curve.csv`: one row per step with
    its `train/loss` and, where the run validated, `val/loss` (from the trial's MLflow run,
    so a pruned or diverged trial's curve ends where it stopped)."""
    curves = {name: {m.step: m.value for m in mlflow_client.get_metric_history(run_id, name)}
              for name in ("train/loss", "val/loss")}
    steps = sorted(set().union(*curves.values()))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "loss_curve.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", *curves])
            for step in steps:
                writer.writerow([step, *(f"{curve[step]:.6g}" if step in curve else ""
                                         for curve in curves.values())])
        optuna.artifacts.upload_artifact(artifact_store=artifacts, file_path=str(path),
                                         study_or_trial=trial, mimetype="text/csv")


class OptunaPruning(L.Callback):
    """Report the validation loss to the trial at each validation, by training step, and
    stop the run when the pruner says so. Optuna's own Lightning callback reports per
    epoch, which is meaningless for step-based LM training."""

    def __init__(self, trial, monitor: str = "val/loss"):
        self.trial, self.monitor = trial, monitor
        self.pruned_step: int | None = None

    def on_validation_end(self, trainer, pl_module):
        # Only validations inside fit: the final trainer.validate() in lab/training/run.py repeats
        # the last step and must not prune a finished run.
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return  # a non-finite loss is divergence: LossMonitor stops the run
        step = trainer.global_step
        self.trial.report(float(value), step=step)
        if self.trial.should_prune():
            self.pruned_step = step
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor} {float(value):.4f}")


def _seed_for(sweep: Sweep, trial) -> int:
    if sweep.sampler == "grid":
        return trial.suggest_categorical("seed", list(sweep.seeds))
    return sweep.seeds[trial.number % len(sweep.seeds)]


class TrialEnd:
    """How a trial ends, recorded once: its `state` user attribute (and the others its end
    gives), the same `state` tag on its MLflow run, its loss curve as an Optuna artifact, and
    one line for the sweep's output."""

    def __init__(self, trial, study_name: str, lr: float, seed: int, uri: str, quiet: bool,
                 artifacts: FileSystemArtifactStore | None):
        self.trial, self.study_name, self.lr, self.seed = trial, study_name, lr, seed
        self.mlflow_client, self.quiet, self.artifacts = records.client(uri), quiet, artifacts
        self.run_ids: list[str] = []
        self.started = time.time()

    def finish(self, state: str, **attrs) -> None:
        trial, run_ids = self.trial, self.run_ids
        trial.set_user_attr("state", state)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if run_ids:
            self.mlflow_client.set_tag(run_ids[0], records.STATE_TAG, state)
        if run_ids and self.artifacts is not None:
            try:
                upload_loss_curve(trial, self.artifacts, self.mlflow_client, run_ids[0])
            except Exception as err:  # the trial's result stands without its picture
                trial.set_user_attr("loss_curve", f"not stored: {type(err).__name__}: {err}"[:300])

    def say(self, outcome: str) -> None:  # one line per finished trial, whichever worker ran it
        if not self.quiet:
            print(f"  [{self.study_name}] trial {self.trial.number}  lr={self.lr:.3g}  "
                  f"seed={self.seed}: {outcome} in {duration(time.time() - self.started)}",
                  flush=True)


def run_trial(trial, sweep: Sweep, variant: str, uri: str, parent_run_id: str,
              quiet: bool = True, notify=None,
              artifacts: FileSystemArtifactStore | None = None) -> float:
    """Train one run for the trial; return its final validation loss, or raise TrialPruned
    for pruned and diverged runs (user attribute `state` tells which). `notify(dict)` hears
    the trial's number and then its MLflow run id (the pool's, lab/experiments/pool.py).
    With `artifacts`, the trial's loss curve is uploaded there whatever its end
    (upload_loss_curve)."""
    notify = notify or (lambda info: None)
    # The owner first: until it is recorded, a rerun cannot tell a trial of a killed worker
    # from one a live worker has just created (fail_stale_trials).
    trial.set_user_attr("worker", owner_identity())
    notify({"trial": trial.number})
    low, high = sweep.lr_bounds()
    lr = trial.suggest_float("lr", low, high, log=True)
    seed = _seed_for(sweep, trial)
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("variant", variant)
    config = sweep.config(variant, lr, seed)
    pruning = OptunaPruning(trial)
    end = TrialEnd(trial, sweep.study_name(variant), lr, seed, uri, quiet, artifacts)

    def on_start(run_id: str) -> None:
        end.run_ids.append(run_id)
        notify({"run_id": run_id})
        trial.set_user_attr("mlflow_run_id", run_id)

    tags = {records.SWEEP_TAG: sweep.name, records.STUDY_TAG: sweep.study_name(variant),
            records.TRIAL_TAG: str(trial.number), records.STATE_TAG: "running"}
    label = f"{variant}/trial-{trial.number}"
    callbacks = [pruning] if quiet else [pruning, RunProgress.for_run(label, config)]
    try:
        # A pruned trial's run ends KILLED, its reason the pruning message.
        result = train_run(config, uri, experiment=sweep.name, parent_run_id=parent_run_id,
                           run_name=f"{label}/lr={lr:.3g}", extra_tags=tags, quiet=True,
                           callbacks=callbacks, on_start=on_start,
                           stopped_by=(optuna.TrialPruned,))
    except optuna.TrialPruned:
        end.finish("pruned", pruned_step=pruning.pruned_step)
        end.say(f"pruned at step {pruning.pruned_step}")
        raise
    except Exception as err:
        end.finish("failed", error=f"{type(err).__name__}: {err}"[:500])
        end.say(f"failed ({type(err).__name__}: {err})"[:300])
        raise
    return _completed(result, end)


def _completed(result, end: TrialEnd) -> float:
    """A trained trial's end: diverged (pruned, so that the sampler moves away) or complete."""
    spikes = int(result.metrics.get("spikes/count", 0))
    if result.diverged_step is not None:
        end.finish("diverged", diverged_step=result.diverged_step, spikes=spikes)
        end.say(f"diverged at step {result.diverged_step}")
        raise optuna.TrialPruned(f"diverged at step {result.diverged_step}")
    loss = float(result.metrics["val/final_loss"])
    end.finish("complete", spikes=spikes)
    end.say(f"val loss {loss:.4f}, {spikes} spike(s)")
    return loss


@dataclass(frozen=True)
class SweepContext:
    """What every worker needs to run any trial of the sweep."""

    sweep: Sweep
    storage: str                  # the Optuna storage's URL, a journal file as an absolute path
    uri: str                      # MLflow
    parents: dict[str, str]       # variant -> its study's parent run
    quiet: bool = True
    artifacts: str | None = None  # the Optuna artifact folder (artifact_dir), absolute


@dataclass(frozen=True)
class TrialTask:
    """One trial of one study: what the pool hands a worker."""

    index: int
    variant: str


def trial_tasks(remaining: dict[str, int]) -> list[TrialTask]:
    """One task per trial still to run, study after study: each study gets exactly its
    budget, whichever worker runs which trial."""
    variants = [variant for variant, n in remaining.items() for _ in range(n)]
    return [TrialTask(index, variant) for index, variant in enumerate(variants)]


def run_trial_task(task: TrialTask, ctx: SweepContext, notify) -> None:
    """One trial in this process. The storage is opened for each trial (reading a journal
    file takes milliseconds; a trial trains for seconds at least), and each trial's
    sampler is seeded afresh, so random draws differ between workers."""
    study = open_study(ctx.sweep, task.variant, open_storage(ctx.storage), sampler_seed=None)
    artifacts = FileSystemArtifactStore(ctx.artifacts) if ctx.artifacts else None
    study.optimize(lambda trial: run_trial(trial, ctx.sweep, task.variant, ctx.uri,
                                           ctx.parents[task.variant], ctx.quiet, notify,
                                           artifacts),
                   n_trials=1, catch=(Exception,), gc_after_trial=True)


class TrialPool(WorkerPool):
    """The sweep's workers (lab/experiments/pool.py): a trial whose worker died is told FAIL
    (retry_failed_trials queues its point again on the next run) and its MLflow run ends
    FAILED, `gatelab.failure_kind=worker_died`; the sweep goes on."""

    job = staticmethod(run_trial_task)

    def __init__(self, slots, threads: int, ctx: SweepContext, studies: dict):
        super().__init__(slots, threads, ctx)
        self.studies = studies    # variant -> the parent's bookkeeping study (open_study)

    def crashed(self, task: TrialTask, started: dict, reason: str) -> None:
        ctx, study = self.context, self.studies[task.variant]
        number = started.get("trial")
        # The runs first, the trial last (fail_stale_trials says why).
        for run_id in trial_runs(ctx.uri, ctx.sweep.name, study.study_name, number,
                                 started.get("run_id")):
            records.client(ctx.uri).set_tag(run_id, records.STATE_TAG, "failed")
            fail_run(ctx.uri, run_id, "worker_died", reason)
        if number is not None:
            study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        if not ctx.quiet:
            trial = f"trial {number}" if number is not None else "a trial (number not recorded)"
            print(f"  [{study.study_name}] {trial}: FAILED: {reason}", flush=True)
