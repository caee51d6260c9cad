"""A sweep's Optuna studies kept: the sampler and pruner a sweep file names, a study opened or
created, and, when a sweep starts again, the trials a killed worker left RUNNING failed and
every failed trial queued again at its own parameters.
"""

from __future__ import annotations

import time
import warnings

import optuna

from lab import records
from lab.experiments.sweep.spec import Sweep, pruner_class
from lab.records import is_local, owner_alive

# How long a RUNNING trial may lack its `worker` attribute before a rerun takes it for one
# whose worker was killed before recording itself: a live worker records itself with its
# first storage write after creating the trial (run_trial), milliseconds later, or once
# Optuna has broken a journal lock left by a killed process (its grace period: 30 s).
UNOWNED_TRIAL_GRACE_S = 60.0


def make_sampler(sweep: Sweep, seed: int | None = None):
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(sweep.grid(), seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(10, max(2, sweep.trials // 3))  # random trials before the model is fitted
    if sweep.sampler == "gp":
        # No constant liar in GPSampler: parallel workers each see only finished trials.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    # constant_liar: parallel workers see each other's running trials and spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=startup)


def make_pruner(sweep: Sweep):
    if sweep.pruner == "none":
        return optuna.pruners.NopPruner()
    options = dict(sweep.pruner_options)
    if sweep.pruner == "median":
        # Early in training a larger LR is ahead almost by construction; comparing only
        # after the first quarter of the steps keeps the pruner from favouring high LRs.
        options.setdefault("n_startup_trials", 2)
        options.setdefault("n_warmup_steps", sweep.steps() // 4)
    return pruner_class(sweep.pruner)(**options)


def open_study(sweep: Sweep, variant: str, storage, sampler_seed: int | None = None,
               sampler=None):
    """The variant's study, created on first use; `sampler`: another than the sweep's own."""
    return optuna.create_study(study_name=sweep.study_name(variant), storage=storage,
                               direction="minimize", load_if_exists=True,
                               sampler=sampler or make_sampler(sweep, sampler_seed),
                               pruner=make_pruner(sweep))


def trial_runs(uri: str, experiment: str | None, study_name: str, number: int | None,
               run_id: str | None) -> set[str]:
    """The MLflow runs of a trial whose worker is gone: the one it recorded, and, since the
    worker can die before recording it, the RUNNING ones tagged with its study and number
    (`experiment`: the sweep's MLflow experiment)."""
    run_ids = {run_id} - {None}
    client = records.client(uri)
    found = client.get_experiment_by_name(experiment) if experiment else None
    if found is not None and number is not None:
        run_ids |= {r.info.run_id for r in records.search_all(
            client, found.experiment_id, f"tags.{records.STUDY_TAG} = '{study_name}' and "
            f"tags.{records.TRIAL_TAG} = '{number}' and attributes.status = 'RUNNING'")}
    return run_ids


def fail_stale_trials(study, uri: str, experiment: str | None = None) -> int:
    """RUNNING trials whose worker process on this host is gone (a killed sweep) become FAIL,
    and their MLflow runs KILLED; retry_failed_trials then queues their points again.
    Trials of live workers, and of other machines, are left alone. A trial that has no owner
    yet is a killed one when it stays without one for UNOWNED_TRIAL_GRACE_S: a live worker
    records itself first, within milliseconds. The runs are found by trial_runs.

    Optuna's public API only: Study.tell by trial number. The tell runs the study's sampler's
    after_trial, so `study` should be opened for bookkeeping (open_study(..., sampler=...)
    as run_sweep does): a GridSampler's would stop an optimize loop, and there is none."""
    def running():
        return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    unowned = [t for t in running() if not t.user_attrs.get("worker")]
    if unowned:
        youngest = min(time.time() - t.datetime_start.timestamp() for t in unowned)
        time.sleep(min(UNOWNED_TRIAL_GRACE_S, max(0.0, UNOWNED_TRIAL_GRACE_S - youngest)))
    unowned_numbers = {t.number for t in unowned}
    failed = 0
    for trial in running():
        worker = trial.user_attrs.get("worker")
        if worker:
            if not is_local(worker) or owner_alive(worker, None):
                continue
        elif trial.number not in unowned_numbers:
            continue  # created after the first look: its worker may still record itself
        # The runs end before the trial is told: a rerun finds only RUNNING trials, so a
        # kill between the two, in the other order, left the runs RUNNING for good (the
        # kill-resume test of tests/integration/test_reliability.py met it on CI). In this order such a
        # kill leaves the trial RUNNING, and the next rerun ends its runs again, harmlessly.
        mlflow_client = records.client(uri)
        for run_id in trial_runs(uri, experiment, study.study_name, trial.number,
                                 trial.user_attrs.get("mlflow_run_id")):
            mlflow_client.set_tag(run_id, records.STATE_TAG, "failed")
            mlflow_client.set_tag(run_id, records.KILLED_REASON_TAG,
                                  f"worker {worker or '(not recorded)'} was gone when the "
                                  "sweep resumed")
            mlflow_client.set_terminated(run_id, "KILLED")
        # skip_if_finished: another process resuming the same sweep may have failed it first.
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        failed += 1
    return failed


def retry_failed_trials(study, limit: int) -> int:
    """Queue FAIL trials (crashed, or killed: fail_stale_trials) again with their own
    parameters, oldest first, each once, at most `limit` trials waiting in all; returns
    how many were queued. Optuna's RetryHeartbeatStaleTrialCallback makes the copy (what
    its heartbeat does for a stale trial): a WAITING trial with the parameters and the
    sampler's attributes, which the next worker takes before sampling a new one.

    A retry keeps the point: a ladder's GridSampler counts a FAIL trial's point as
    visited, so without it the point would never run and the study would end short, or a
    later rerun would run another point twice."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback
    trials = study.get_trials(deepcopy=False)
    room = limit - sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    queued = 0
    with warnings.catch_warnings():  # the callback is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = {number for t in trials for number in retry.retry_history(t)}
        for trial in trials:
            if queued >= room:
                break
            if trial.state == optuna.trial.TrialState.FAIL and trial.number not in retried:
                retry()(study, trial)
                queued += 1
    return queued


def counted_trials(study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
              optuna.trial.TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))
