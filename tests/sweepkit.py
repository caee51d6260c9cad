"""Shared by the sweep tests: an Optuna trial made up with a final state and no training."""

from __future__ import annotations

import optuna

LR = {"lr": optuna.distributions.FloatDistribution(1e-4, 100, log=True)}


def made_up_trial(lr: float, value: float | None = None, state: str = "complete", spikes: int = 0):
    """A finished trial at `lr`: complete with final validation loss `value` and its spike
    count, or PRUNED with user attribute `state` (pruned | diverged) as run_trial ends one."""
    if state == "complete":
        return optuna.trial.create_trial(params={"lr": lr}, distributions=LR, value=value,
                                         user_attrs={"state": state, "spikes": spikes})
    return optuna.trial.create_trial(params={"lr": lr}, distributions=LR,
                                     state=optuna.trial.TrialState.PRUNED,
                                     user_attrs={"state": state})
