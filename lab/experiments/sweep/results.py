"""A sweep's results read from its studies: per variant, every LR's trials by outcome, the
best LR and the largest stable one. What `gatelab sweep` logs to its parent runs,
`gatelab sweep-report` shows, and a grid's `lrs: {from_sweep:}` reads (`best_lrs`): this
module imports no trainer, sampler or worker, so reading a best LR costs Optuna's import
and the storage's, no more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna

from lab.errors import LabError
from lab.experiments.sweep.storage import open_storage, redact, storage_url

STABLE_TOLERANCE = 0.02   # "max stable LR": within 2% of the best final validation loss
STATES = ("complete", "pruned", "diverged", "failed")


@dataclass
class LRPoint:
    """Every trial at one learning rate (several seeds), by outcome."""

    lr: float
    losses: list[float] = field(default_factory=list)    # final val loss of completed trials
    diverged: int = 0
    pruned: int = 0
    failed: int = 0
    spikes: list[int] = field(default_factory=list)

    @property
    def mean_loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None


@dataclass
class VariantSummary:
    variant: str
    study: str
    points: list[LRPoint]
    best_lr: float | None
    best_loss: float | None
    max_stable_lr: float | None
    counts: dict[str, int]
    tolerance: float = STABLE_TOLERANCE


def trial_state(trial) -> str:
    """complete | pruned | diverged | failed (running trials are not analysed)."""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return "complete"
    if trial.state == optuna.trial.TrialState.PRUNED:
        return "diverged" if trial.user_attrs.get("state") == "diverged" else "pruned"
    if trial.state == optuna.trial.TrialState.FAIL:
        return "failed"
    return "running"


def summarize_trials(trials, variant: str = "", study: str = "",
                     tolerance: float = STABLE_TOLERANCE) -> VariantSummary:
    """Best LR = the LR with the lowest mean final validation loss over its completed trials.
    Max stable LR = the largest LR none of whose trials diverged and whose mean loss is
    within `tolerance` (relative) of the best: the paper's "tolerates a larger LR" (4.4)."""
    points: dict[float, LRPoint] = {}
    counts = {state: 0 for state in STATES}
    for trial in trials:
        state = trial_state(trial)
        if state == "running" or "lr" not in trial.params:
            continue
        counts[state] += 1
        point = points.setdefault(float(trial.params["lr"]), LRPoint(float(trial.params["lr"])))
        if state == "complete":
            point.losses.append(float(trial.value))
        else:
            setattr(point, state, getattr(point, state) + 1)
        if "spikes" in trial.user_attrs:
            point.spikes.append(int(trial.user_attrs["spikes"]))
    ordered = sorted(points.values(), key=lambda p: p.lr)
    scored = [p for p in ordered if p.mean_loss is not None]
    best = min(scored, key=lambda p: p.mean_loss, default=None)
    stable = [p for p in scored if not p.diverged and best is not None
              and p.mean_loss <= best.mean_loss * (1 + tolerance)]
    return VariantSummary(variant, study, ordered, best.lr if best else None,
                          best.mean_loss if best else None,
                          max((p.lr for p in stable), default=None), counts, tolerance)


def summarize_sweep(sweep_name: str, storage: str | None = None, variants: list[str] | None = None,
                    tolerance: float = STABLE_TOLERANCE) -> dict[str, VariantSummary]:
    url = storage_url(sweep_name, storage)
    optuna_storage = open_storage(url, create=False)
    prefix = f"{sweep_name}/"
    names = [s.study_name for s in optuna.get_all_study_summaries(optuna_storage, include_best_trial=False)
             if s.study_name.startswith(prefix)]
    if not names:
        raise LabError(f"sweep: no studies named {prefix}<variant> in {redact(url)}")
    out = {}
    for name in names:
        variant = name[len(prefix):]
        if variants is not None and variant not in variants:
            continue
        study = optuna.load_study(study_name=name, storage=optuna_storage)
        out[variant] = summarize_trials(study.get_trials(deepcopy=False), variant, name, tolerance)
    return out


def best_lrs(sweep_name: str, storage: str | None = None) -> dict[str, float]:
    """variant -> best learning rate of a finished sweep (what a grid's `lrs: {from_sweep:}`
    reads). Variants without a completed trial are left out."""
    return {variant: summary.best_lr
            for variant, summary in summarize_sweep(sweep_name, storage).items()
            if summary.best_lr is not None}
