"""`gatelab sweep` (`run_sweep`): the sweep's studies opened or resumed, a parent run per
study, the trials still to run handed to this process or a pool of workers, and the
summaries logged to the parent runs.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

from lab import check as lab_check
from lab import records
from lab.experiments.overrides import override_pairs
from lab.experiments.pool import gpu_slots, parse_gpus, threads_per_worker
from lab.experiments.sweep.results import VariantSummary, summarize_sweep
from lab.experiments.sweep.spec import Sweep, positive_int
from lab.experiments.sweep.storage import artifact_dir, open_storage, redact, storage_url
from lab.experiments.sweep.studies import (counted_trials, fail_stale_trials, open_study,
                                           retry_failed_trials)
from lab.experiments.sweep.trials import SweepContext, TrialPool, run_trial_task, trial_tasks
from lab.interrupts import interruption, note_killed, stop_on_signals
from lab.model.params import count_params
from lab.progress import configure_output
from lab.records import OWNER_TAG, end_dead_runs, owner_identity
from lab.training.preflight import preflight
from lab.training.corpus import open_data
from lab.training.step import use_compile_cache


def parent_run(sweep: Sweep, variant: str, uri: str, storage: str) -> str:
    """Find or create the study's parent run (tags sweep, study, sweep_role=parent), and mark
    it RUNNING: a resumed sweep reuses the parent it had; two machines starting the same new
    sweep end up with one parent (lab.records.find_or_create_run)."""
    mlflow_client = records.client(uri)
    experiment = records.experiment_id(mlflow_client, sweep.name, uri)
    study = sweep.study_name(variant)
    owner = {OWNER_TAG: owner_identity(), records.HEARTBEAT_TAG: str(int(time.time()))}
    run_id, created = records.find_or_create_run(
        mlflow_client, experiment, {records.STUDY_TAG: study, records.SWEEP_ROLE_TAG: "parent"},
        study, extra_tags={records.SWEEP_TAG: sweep.name, records.VARIANT_TAG: variant,
                           records.PRESET_TAG: sweep.preset,
                           records.GIT_COMMIT_TAG: records.git_commit(), **owner})
    if not created:
        mlflow_client.update_run(run_id, status="RUNNING")
        for key, value in owner.items():  # this process's now (a SIGKILL: end_dead_runs)
            mlflow_client.set_tag(run_id, key, value)
        return run_id
    low, high = sweep.lr_bounds()
    params = {"sweep.preset": sweep.preset, "sweep.data": sweep.data, "sweep.tokens": sweep.tokens,
              "sweep.sampler": sweep.sampler, "sweep.pruner": sweep.pruner,
              "sweep.trials": sweep.trials, "sweep.seeds": list(sweep.seeds),
              "sweep.lr_low": low, "sweep.lr_high": high,
              "sweep.lr_ladder": list(sweep.lr_ladder) or None,
              "sweep.overrides": override_pairs(sweep.overrides), "sweep.storage": redact(storage)}
    records.log_params(mlflow_client, run_id, params)
    records.log_yaml(mlflow_client, run_id, sweep.to_dict(), "sweep.yaml")
    return run_id


def run_sweep(sweep: Sweep, n_trials: int | None = None, workers: int = 1,
              storage: str | None = None, tracking_uri: str | None = None,
              quiet: bool = False, check: bool | str = True) -> dict[str, VariantSummary]:
    """Run (or resume) the sweep: each study gets up to `n_trials` trials that completed or
    were pruned; crashed and killed trials are run again at their own parameters
    (retry_failed_trials). Returns the per-variant summary. `check`: on
    a GPU, `gatelab check` of the sweep's variants first (lab/check.py) where they have not
    passed before on this code and device; "force": all of them.

    `workers` > 1: a TrialPool, each worker pinned to one of the visible GPUs (gpu_slots:
    spread evenly, several per GPU when there are more workers than GPUs), or sharing the
    CPU cores; trials are handed out one at a time. One worker runs in this process."""
    if n_trials is not None:
        positive_int("--n-trials", n_trials)
    positive_int("--workers", workers)
    gpus = parse_gpus(None)
    n_trials = n_trials or sweep.trials
    url = storage_url(sweep.name, storage or sweep.storage)
    configure_output()  # Optuna is imported now: its trial log follows the command's level
    optuna_storage = open_storage(url)  # a bad URL fails here, before any MLflow run
    artifacts = artifact_dir(url, sweep.name)
    uri = records.tracking_uri(tracking_uri)
    check_table = _before_trials(sweep, uri, quiet, check, gpus)
    opened = Opened()
    status = "FAILED"
    with stop_on_signals(), ExitStack() as beats:  # SIGINT, SIGTERM: the trials' runs end KILLED
        try:
            # Runs a SIGKILLed sweep left RUNNING (its parents, a trial's run whose trial the
            # storage no longer holds); the trials themselves: fail_stale_trials below.
            end_dead_runs(records.client(uri), sweep.name, "the sweep started again")
            for variant in sweep.variants:
                _open_variant(sweep, variant, opened, optuna_storage, n_trials, uri, url, quiet)
                beats.enter_context(records.heartbeat(records.client(uri),
                                                      opened.parents[variant]))
                if check_table is not None:  # the check that vouches for these trials
                    records.log_check_table(records.client(uri), opened.parents[variant],
                                            check_table)
            if not quiet:
                for variant in sweep.variants:
                    print(f"[{sweep.study_name(variant)}] {opened.remaining[variant]} trial(s) "
                          f"to run; storage {redact(url)}; MLflow parent run "
                          f"{opened.parents[variant]}", flush=True)
            # Workers may run elsewhere than this working directory (the forkserver's).
            ctx = SweepContext(sweep, url if "://" in url else str(Path(url).resolve()), uri,
                               opened.parents, quiet, str(artifacts))
            _run_trials(trial_tasks(opened.remaining), ctx, workers, gpus, opened.studies)
            status = "FINISHED"
        except BaseException as err:
            stop = interruption(err)
            if stop is None:
                raise
            status = "KILLED"
            note_killed(len(opened.parents))
            for run_id in opened.parents.values():
                records.client(uri).set_tag(run_id, records.KILLED_REASON_TAG,
                                            f"stopped by {stop.name}")
            raise stop from None
        finally:
            mlflow_client = records.client(uri)
            for run_id in opened.parents.values():
                mlflow_client.set_terminated(run_id, status)
    return _log_summaries(sweep, url, uri, opened.parents)


def _before_trials(sweep: Sweep, uri: str, quiet: bool, check: bool | str,
                   gpus: list[str]) -> dict | None:
    """Each variant runnable here (preflight), the data prepared, the store's room checked,
    and (on a GPU) `gatelab check` of the sweep's variants: its table, or None where it did
    not run."""
    # Each variant at the sweep's lowest LR and first seed: what these checks need of a trial.
    configs = [sweep.config(variant, sweep.lr_bounds()[0], sweep.seeds[0])
               for variant in sweep.variants]
    for config in configs:
        preflight(config, "cuda" if gpus else "cpu")
    # Prepare the data once, here: workers would otherwise race to build the same cache.
    open_data(configs[0])
    records.check_writable(uri, max(count_params(config)["total"] for config in configs))
    if not check:
        return None
    return lab_check.check_before_training(sweep.preset, list(sweep.variants),
                                           override_pairs(sweep.overrides), quiet,
                                           force=check == "force")


@dataclass
class Opened:
    """The sweep's studies as this start opened them, filled study by study: a stop midway
    still ends the parent runs opened so far."""

    studies: dict = field(default_factory=dict)              # variant -> bookkeeping study
    parents: dict[str, str] = field(default_factory=dict)    # variant -> its parent run
    remaining: dict[str, int] = field(default_factory=dict)  # variant -> trials still to run


def _open_variant(sweep: Sweep, variant: str, opened: Opened, optuna_storage, n_trials: int,
                  uri: str, url: str, quiet: bool) -> None:
    """The variant's study, its killed trials failed and its failed ones queued again, and
    its parent run, RUNNING from here."""
    # This process only records and tells; a GridSampler's after_trial would
    # stop an optimize loop when a tell visits its last point (fail_stale_trials).
    study = opened.studies[variant] = open_study(
        sweep, variant, optuna_storage, sampler=optuna.samplers.RandomSampler())
    for key, value in (("sweep", sweep.name), ("variant", variant), ("preset", sweep.preset)):
        study.set_user_attr(key, value)
    stale = fail_stale_trials(study, uri, sweep.name)
    opened.remaining[variant] = max(0, n_trials - counted_trials(study))
    queued = retry_failed_trials(study, opened.remaining[variant])
    if (stale or queued) and not quiet:
        print(f"[{study.study_name}] {stale} trial(s) of a killed worker marked "
              f"failed; {queued} failed trial(s) queued again with their parameters")
    opened.parents[variant] = parent_run(sweep, variant, uri, url)


def _run_trials(tasks: list, ctx: SweepContext, workers: int, gpus: list[str],
                studies: dict) -> None:
    """The trials in this process (one worker), or by a TrialPool."""
    workers = max(1, min(workers, len(tasks)))
    # On the CPU a narrow model trains on one thread per worker, as a grid's cells do
    # (pool.threads_per_worker); GPU workers split the cores.
    sweep = ctx.sweep
    d_model = None if gpus else \
        sweep.config(sweep.variants[0], sweep.lr_bounds()[0], sweep.seeds[0]).model.d_model
    if workers == 1:
        torch.set_num_threads(threads_per_worker(1, d_model))
        for task in tasks:
            run_trial_task(task, ctx, notify=lambda info: None)
        return
    # The workers inherit this process's environment, where importing Lightning set torch's
    # temporary folder, and cannot tell who set it: the lab's folder first, as a grid does
    # (lab/training/step.py use_compile_cache).
    use_compile_cache()
    pool = TrialPool(gpu_slots(gpus, workers), threads_per_worker(workers, d_model), ctx, studies)
    try:
        pool.run(tasks, on_outcome=lambda outcome: None, on_dispatch=lambda task, slot: None)
    except BaseException as err:  # each worker ends its trial's run KILLED for the same signal
        stop = interruption(err)
        pool.close(stop.signum if stop is not None else None)
        raise
    pool.close()


def _log_summaries(sweep: Sweep, url: str, uri: str,
                   parents: dict[str, str]) -> dict[str, VariantSummary]:
    """Each study's summary, its best and max-stable LR logged to its parent run."""
    summaries = summarize_sweep(sweep.name, url, variants=list(sweep.variants))
    for variant, summary in summaries.items():
        for name, value in (("best/lr", summary.best_lr), ("best/val_loss", summary.best_loss),
                            ("max_stable/lr", summary.max_stable_lr)):
            if value is not None:
                records.client(uri).log_metric(parents[variant], name, value)
    return summaries
