"""Learning-rate sweeps per variant with Optuna: the paper's stability claim (docs/paper.md
§7.4, Table 2 in §9.2).

The paper's second claim is that SDPA gating tolerates larger learning rates: at 8e-3 the
48-layer baseline diverges while the gated model trains to its best perplexity
(docs/paper.md §7.4).
A sweep measures that per variant: one Optuna study per variant (`<sweep>/<variant>`),
objective = final validation loss, and afterwards the best LR and the largest stable LR.

Choices the paper leaves to us, all documented here and in docs/sweeps.md:
- One trial is one training run at one (LR, seed). With a ladder the grid is LR x seed; with
  a range (TPE or random) the seed is `seeds[trial.number % len(seeds)]`, a fixed rotation
  the sampler does not search. Trials at the same LR are averaged in the analysis.
- Pruning reports the validation loss at the training step (`trial.report(loss,
  step=global_step)`), not per epoch: LM training here is one long epoch.
- A diverged trial (non-finite loss, or loss above the ceiling; lab/training/callbacks.py) ends as
  Optuna state PRUNED with user attribute `state=diverged`. PRUNED, not FAIL, because the
  samplers learn from pruned trials (TPE ranks them below every completed trial), so the
  search moves away from LRs that blow up; and a pruned trial can never be `best_trial`.
  Early-stopped trials are PRUNED with `state=pruned`; crashes (an exception) are FAIL.
- Default storage: an Optuna journal file `sweeps/<name>.journal` under the working
  directory. Its writes are appends serialised by a lock file (Optuna's default symlink
  lock, the same lock optuna-dashboard uses), which is what several worker processes on
  one machine need; SQLite under concurrent writers raises "database is locked". For
  workers on several machines pass `--storage postgresql://...`.
- Workers are processes (`--workers N`), not threads: training is CPU/GPU bound and holds
  the GIL. They are the grid's pool (lab/experiments/pool.py): each pinned to one GPU where
  there are GPUs, handed the trials still to run one at a time (so a study ends with
  exactly its trial budget), and a worker that dies is reported with its trial.
- Each trial's loss curve (`train/loss` and `val/loss` by step, as its MLflow run holds them)
  is also an Optuna artifact, `loss_curve.csv`, in a FileSystemArtifactStore beside the
  journal (`sweeps/<name>.artifacts/`; artifact_dir), where optuna-dashboard shows it
  (`optuna-dashboard sweeps/<name>.journal --artifact-dir sweeps/<name>.artifacts`).
- Samplers: TPE (default), random, GP (Optuna's GPSampler: a Gaussian process over the one
  searched dimension, log LR), and grid for a ladder.
- MLflow: a parent run per study (found again by its tags when a sweep is resumed) and
  exactly one child run per trial, created inside the trial, tagged with the trial number,
  LR, seed and final `state` (complete | pruned | diverged | failed). Pruned runs end KILLED,
  diverged ones FINISHED with `diverged=true` (as lab/training/run.py records them).
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import inspect
import math
import os
import tempfile
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import optuna
import torch
from lightning.pytorch.trainer.states import TrainerFn
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages.journal import JournalFileBackend, JournalStorage

from lab import check as lab_check
from lab import records
from lab.config import resolve
from lab.errors import LabError, check_choice, check_positive_int
from lab.experiments.files import parse_variants, yaml_number
from lab.experiments.overrides import override_pairs
from lab.experiments.pool import WorkerPool, fail_run, gpu_slots, parse_gpus, threads_per_worker
from lab.experiments.schema import ExperimentSpec, KeyReader, nonempty_string
from lab.interrupts import interruption, note_killed, stop_on_signals
from lab.model.params import count_params
from lab.progress import configure_output, duration
from lab.records import OWNER_TAG, end_dead_runs, is_local, owner_alive, owner_identity
from lab.training.callbacks import RunProgress
from lab.training.run import open_data, train_run
from lab.training.schedule import total_steps

SAMPLERS = ("tpe", "random", "gp", "grid")
PRUNERS = ("median", "successive_halving", "none")
SWEEP_DIR = "sweeps"
STABLE_TOLERANCE = 0.02   # "max stable LR": within 2% of the best final validation loss
STATES = ("complete", "pruned", "diverged", "failed")
# How long a RUNNING trial may lack its `worker` attribute before a rerun takes it for one
# whose worker was killed before recording itself: a live worker records itself with its
# first storage write after creating the trial (run_trial), milliseconds later, or once
# Optuna has broken a journal lock left by a killed process (its grace period: 30 s).
UNOWNED_TRIAL_GRACE_S = 60.0


# --- the sweep file -----------------------------------------------------------------

def _lr_key(raw) -> dict:
    """`lr`: {low: <lr>, high: <lr>} (log-uniform) or {ladder: [<lr>, ...]}."""
    if not isinstance(raw, dict) or not (set(raw) <= {"low", "high", "ladder"}) or \
            ("ladder" in raw) == ("low" in raw or "high" in raw):
        raise LabError("lr: expected {low: <lr>, high: <lr>} (log-uniform) or "
                       f"{{ladder: [<lr>, ...]}}, got {raw!r}")
    if "ladder" in raw:
        ladder = raw["ladder"]
        if not isinstance(ladder, list) or not ladder:
            raise LabError(f"lr.ladder: expected a non-empty list of learning rates, got {ladder!r}")
        values = tuple(sorted({yaml_number("lr.ladder", v) for v in ladder}))
        return {"lr_ladder": values}
    if "low" not in raw or "high" not in raw:
        raise LabError("lr: a range needs both low and high")
    low, high = yaml_number("lr.low", raw["low"]), yaml_number("lr.high", raw["high"])
    if not low < high:
        raise LabError(f"lr: low ({low:g}) must be below high ({high:g})")
    return {"lr_low": low, "lr_high": high}


def _pruner_key(raw) -> dict:
    """`median`, or `{kind: median, n_startup_trials: 2, ...}` (options go to Optuna's pruner)."""
    if isinstance(raw, dict):
        options = dict(raw)
        kind = options.pop("kind", None)
    else:
        kind, options = raw, {}
    check_choice("pruner", kind, PRUNERS)
    if options:
        allowed = set(inspect.signature(_pruner_class(kind)).parameters) if kind != "none" else set()
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise LabError(f"pruner: unknown option(s) {', '.join(unknown)} for {kind}; allowed: "
                           f"{', '.join(sorted(allowed)) or '(none)'}")
        try:  # Optuna checks its options' values when the pruner is made: here, not mid-sweep
            _pruner_class(kind)(**options)
        except (TypeError, ValueError) as err:
            raise LabError(f"pruner: options {options} refused by Optuna's {kind} pruner: "
                           f"{err}") from None
    return {"pruner": kind, "pruner_options": options}


def _pruner_class(kind: str):
    return {"median": optuna.pruners.MedianPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner}[kind]


def _variants_key(raw) -> dict:
    variants = parse_variants(raw)
    if variants == "all":
        raise LabError("variants: a sweep lists its variants by name ('all' is for grids)")
    return {"variants": variants}


def _sampler_key(raw) -> dict:
    check_choice("sampler", raw, SAMPLERS)
    return {"sampler": raw}


@dataclass(frozen=True, kw_only=True)
class Sweep(ExperimentSpec):
    """A validated sweep file (sweeps/*.yaml): the schema's fields and the search. Every
    variant resolves at both ends of the LR range at every seed (checked on creation, so
    also after `with_flags`): unknown presets, variants, override keys and impossible shapes
    fail before any trial or run."""

    lr_low: float | None = None          # log-uniform range ...
    lr_high: float | None = None
    lr_ladder: tuple[float, ...] = ()    # ... or an explicit ladder (grid)
    trials: int = 8                      # per variant
    sampler: str = "tpe"
    pruner: str = "median"
    pruner_options: dict = field(default_factory=dict)
    storage: str | None = None
    description: str = ""

    kind: ClassVar[str] = "sweep"
    required: ClassVar[tuple[str, ...]] = ("name", "preset", "variants", "lr")

    @classmethod
    def keys(cls) -> dict[str, KeyReader]:
        return {**super().keys(), "variants": _variants_key, "lr": _lr_key,
                "trials": lambda value: {"trials": _positive_int("trials", value)},
                "sampler": _sampler_key, "pruner": _pruner_key,
                "storage": lambda value: {"storage": nonempty_string(
                    "storage", value, "a storage URL or journal file path")},
                "description": lambda value: {"description": str(value)}}

    @classmethod
    def complete(cls, fields: dict) -> dict:
        """A ladder's sampler is grid and its trials the whole grid; a range's, TPE and 8."""
        ladder = "lr_ladder" in fields
        sampler = fields.setdefault("sampler", "grid" if ladder else "tpe")
        if ladder != (sampler == "grid"):
            raise LabError(f"sampler: {sampler!r} does not fit the lr field: an lr.ladder needs "
                           "sampler grid, an lr range (low/high) needs tpe, random or gp")
        grid_size = len(fields.get("lr_ladder", ())) * len(fields.get("seeds", (0,)))
        fields.setdefault("trials", grid_size if ladder else 8)
        return fields

    def __post_init__(self):
        low, high = self.lr_bounds()
        for variant in self.variants:
            for seed in self.seeds:
                for value in (low, high):
                    self.config(variant, value, seed)

    def study_name(self, variant: str) -> str:
        return f"{self.name}/{variant}"

    def grid(self) -> dict[str, list]:
        return {"lr": list(self.lr_ladder), "seed": list(self.seeds)}

    def config(self, variant: str, lr: float, seed: int):
        return resolve(variant, self.preset, self.overrides, data=self.data,
                       tokens=self.tokens, seed=seed, lr=lr)

    def steps(self) -> int:
        """Optimizer steps of one trial (the pruners' unit)."""
        return total_steps(self.config(self.variants[0], self.lr_bounds()[0], self.seeds[0]))

    def lr_bounds(self) -> tuple[float, float]:
        if self.lr_ladder:
            return min(self.lr_ladder), max(self.lr_ladder)
        return self.lr_low, self.lr_high

    def with_variants(self, variants: list[str]) -> "Sweep":
        unknown = [v for v in variants if v not in self.variants]
        if unknown or not variants:
            raise LabError(f"--variants: {', '.join(unknown) or '(none)'} not in sweep "
                           f"{self.name!r}; allowed: {', '.join(self.variants)}")
        return dataclasses.replace(self, variants=tuple(variants))

    def to_dict(self) -> dict:
        # sweep.yaml on the parent runs has always held the overrides as 'key=value' lines.
        return {**super().to_dict(), "overrides": override_pairs(self.overrides)}


def _positive_int(field_name: str, value) -> int:
    check_positive_int(field_name, value)
    return value


def parse_sweep(raw: Any, source: str = "sweep") -> Sweep:
    """A loaded YAML document -> a validated Sweep; every field checked before anything runs."""
    return Sweep.from_dict(raw, source)


def load_sweep(path: str | Path) -> Sweep:
    return Sweep.load(path)


# --- storage ------------------------------------------------------------------------

def default_storage(name: str) -> str:
    return str(Path(SWEEP_DIR) / f"{name}.journal")


def storage_url(sweep_name: str, explicit: str | None = None) -> str:
    """--storage, else the sweep file's `storage`, else `sweeps/<name>.journal`.

    Looks for `sweeps/<name>.yaml` under the working directory when only a name is given
    (sweep-report, best_lrs), so a sweep that names its own storage is found again."""
    if explicit:
        return explicit
    path = Path(SWEEP_DIR) / f"{sweep_name}.yaml"
    if path.is_file():
        try:
            raw = Sweep.read_extended(path)  # a `storage` it extends counts too
        except LabError:
            raw = None
        if isinstance(raw, dict) and raw.get("name") == sweep_name and raw.get("storage"):
            return raw["storage"]
    return default_storage(sweep_name)


def open_storage(url: str, create: bool = True):
    """A URL with a scheme (postgresql://, mysql://, sqlite:///) is an RDB storage; anything
    else is a path to an Optuna journal file (the form optuna-dashboard also accepts)."""
    if "://" in url:
        if url.startswith(("postgresql://", "postgres://")):
            # SQLAlchemy 2.1 maps a plain postgresql:// URL to the psycopg (3) driver.
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise LabError("--storage: a postgresql:// storage needs the psycopg driver: "
                               "pip install 'psycopg[binary]==3.3.9' (the postgres extra)") from None
        try:
            return optuna.storages.RDBStorage(url, skip_table_creation=not create,
                                              engine_kwargs={"pool_pre_ping": True})
        except Exception as err:  # sqlalchemy's errors are many; the user needs one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LabError(f"--storage: cannot open {_redact(url)}: {first}") from None
    path = Path(url)
    if not create and not path.is_file():
        raise LabError(f"--storage: no sweep storage at {path} (run `gatelab sweep` first, or "
                       "pass --storage)")
    if path.is_dir():
        raise LabError(f"--storage: {path} is a directory; pass a journal file path in it, "
                       f"e.g. {path / 'sweep.journal'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every trial appends to the journal and takes a lock file beside it: both must be
        # writable now, not when the first trial has trained.
        for place in (path.parent, path) if path.exists() else (path.parent,):
            if not os.access(place, os.W_OK):
                raise PermissionError(errno.EACCES, f"{place} is not writable")
        # Default lock (a symlink lock file beside the journal): atomic on local and NFS file
        # systems, and the lock optuna-dashboard takes when it opens the same file. The path
        # made absolute: the lock is a symlink to the journal as named here, and a relative
        # name resolves from the lock's own folder, where it dangles; Optuna then never starts
        # the lock's grace period (its os.stat of the lock fails, and it retries at once), so
        # a lock left by a killed process was never broken and the next start spun forever.
        return JournalStorage(JournalFileBackend(str(path.resolve())))
    except OSError as err:  # read-only place, a parent that is a file, a full disk
        raise LabError(f"--storage: cannot write the journal file {path}: "
                       f"{err.strerror or err}; pass a writable path") from None


def artifact_dir(url: str, sweep_name: str) -> Path:
    """Where the sweep's Optuna artifacts go, created: beside a journal file, its name with
    `.artifacts` for `.journal` (`sweeps/lr.journal` -> `sweeps/lr.artifacts/`); for an RDB
    storage, `sweeps/<name>.artifacts/` under the working directory of each machine."""
    journal = Path(url) if "://" not in url else Path(SWEEP_DIR) / sweep_name
    folder = journal.with_suffix(".artifacts") if journal.suffix == ".journal" else \
        journal.with_name(journal.name + ".artifacts")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LabError(f"--storage: cannot create the artifact folder {folder} beside it: "
                       f"{err.strerror or err}") from None
    return folder.resolve()


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


def _redact(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (a journal file's
    path as it is)"""
    if "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}://{credentials}{at}{host}"


# --- Optuna objects -----------------------------------------------------------------

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
    return _pruner_class(sweep.pruner)(**options)


def open_study(sweep: Sweep, variant: str, storage, sampler_seed: int | None = None,
               sampler=None):
    """The variant's study, created on first use; `sampler`: another than the sweep's own."""
    return optuna.create_study(study_name=sweep.study_name(variant), storage=storage,
                               direction="minimize", load_if_exists=True,
                               sampler=sampler or make_sampler(sweep, sampler_seed),
                               pruner=make_pruner(sweep))


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


# --- MLflow parent runs -------------------------------------------------------------

def parent_run(sweep: Sweep, variant: str, uri: str, storage: str) -> str:
    """Find or create the study's parent run (tags sweep, study, sweep_role=parent), and mark
    it RUNNING: a resumed sweep reuses the parent it had; two machines starting the same new
    sweep end up with one parent (lab.records.find_or_create_run)."""
    mlflow_client = records.client(uri)
    experiment = records.experiment_id(mlflow_client, sweep.name, uri)
    study = sweep.study_name(variant)
    owner = {OWNER_TAG: owner_identity(), records.HEARTBEAT_TAG: str(int(time.time()))}
    run_id, created = records.find_or_create_run(
        mlflow_client, experiment, {"study": study, "sweep_role": "parent"}, study,
        extra_tags={"sweep": sweep.name, "variant": variant, "preset": sweep.preset,
                    "git_commit": records.git_commit(), **owner})
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
              "sweep.overrides": override_pairs(sweep.overrides), "sweep.storage": _redact(storage)}
    records.log_params(mlflow_client, run_id, params)
    records.log_yaml(mlflow_client, run_id, sweep.to_dict(), "sweep.yaml")
    return run_id


# --- the objective: one trial = one training run --------------------------------------

def _seed_for(sweep: Sweep, trial) -> int:
    if sweep.sampler == "grid":
        return trial.suggest_categorical("seed", list(sweep.seeds))
    return sweep.seeds[trial.number % len(sweep.seeds)]


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
    mlflow_client = records.client(uri)
    run_ids: list[str] = []

    def on_start(run_id: str) -> None:
        run_ids.append(run_id)
        notify({"run_id": run_id})
        trial.set_user_attr("mlflow_run_id", run_id)

    def finish(state: str, **attrs) -> None:
        trial.set_user_attr("state", state)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if run_ids:
            mlflow_client.set_tag(run_ids[0], "state", state)
        if run_ids and artifacts is not None:
            try:
                upload_loss_curve(trial, artifacts, mlflow_client, run_ids[0])
            except Exception as err:  # the trial's result stands without its picture
                trial.set_user_attr("loss_curve", f"not stored: {type(err).__name__}: {err}"[:300])

    tags = {"sweep": sweep.name, "study": sweep.study_name(variant), "trial": str(trial.number),
            "state": "running"}
    label = f"{variant}/trial-{trial.number}"
    callbacks = [pruning] if quiet else [pruning, RunProgress(
        label, total_steps(config), config.train.batch_size * config.model.context)]
    started = time.time()

    def say(outcome: str) -> None:  # one line per finished trial, whichever worker ran it
        if not quiet:
            print(f"  [{sweep.study_name(variant)}] trial {trial.number}  lr={lr:.3g}  "
                  f"seed={seed}: {outcome} in {duration(time.time() - started)}", flush=True)

    try:
        # A pruned trial's run ends KILLED, its reason the pruning message.
        result = train_run(config, uri, experiment=sweep.name, parent_run_id=parent_run_id,
                           run_name=f"{label}/lr={lr:.3g}", extra_tags=tags, quiet=True,
                           callbacks=callbacks, on_start=on_start,
                           stopped_by=(optuna.TrialPruned,))
    except optuna.TrialPruned:
        finish("pruned", pruned_step=pruning.pruned_step)
        say(f"pruned at step {pruning.pruned_step}")
        raise
    except Exception as err:
        finish("failed", error=f"{type(err).__name__}: {err}"[:500])
        say(f"failed ({type(err).__name__}: {err})"[:300])
        raise
    spikes = int(result.metrics.get("spikes/count", 0))
    if result.diverged_step is not None:
        finish("diverged", diverged_step=result.diverged_step, spikes=spikes)
        say(f"diverged at step {result.diverged_step}")
        raise optuna.TrialPruned(f"diverged at step {result.diverged_step}")
    loss = float(result.metrics["val/final_loss"])
    finish("complete", spikes=spikes)
    say(f"val loss {loss:.4f}, {spikes} spike(s)")
    return loss


# --- workers ------------------------------------------------------------------------

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
            records.client(ctx.uri).set_tag(run_id, "state", "failed")
            fail_run(ctx.uri, run_id, "worker_died", reason)
        if number is not None:
            study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        if not ctx.quiet:
            trial = f"trial {number}" if number is not None else "a trial (number not recorded)"
            print(f"  [{study.study_name}] {trial}: FAILED: {reason}", flush=True)


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
            client, found.experiment_id, f"tags.study = '{study_name}' and "
            f"tags.trial = '{number}' and attributes.status = 'RUNNING'")}
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
        # kill-resume test of tests/test_reliability.py met it on CI). In this order such a
        # kill leaves the trial RUNNING, and the next rerun ends its runs again, harmlessly.
        mlflow_client = records.client(uri)
        for run_id in trial_runs(uri, experiment, study.study_name, trial.number,
                                 trial.user_attrs.get("mlflow_run_id")):
            mlflow_client.set_tag(run_id, "state", "failed")
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


def _done(study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
              optuna.trial.TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def run_sweep(sweep: Sweep, n_trials: int | None = None, workers: int = 1,
              storage: str | None = None, tracking_uri: str | None = None,
              quiet: bool = False, check: bool | str = True) -> dict[str, "VariantSummary"]:
    """Run (or resume) the sweep: each study gets up to `n_trials` trials that completed or
    were pruned; crashed and killed trials are run again at their own parameters
    (retry_failed_trials). Returns the per-variant summary. `check`: on
    a GPU, `gatelab check` of the sweep's variants first (lab/check.py) where they have not
    passed before on this code and device; "force": all of them.

    `workers` > 1: a TrialPool, each worker pinned to one of the visible GPUs (gpu_slots:
    spread evenly, several per GPU when there are more workers than GPUs), or sharing the
    CPU cores; trials are handed out one at a time. One worker runs in this process."""
    if n_trials is not None:
        _positive_int("--n-trials", n_trials)
    _positive_int("--workers", workers)
    gpus = parse_gpus(None)
    n_trials = n_trials or sweep.trials
    url = storage_url(sweep.name, storage or sweep.storage)
    configure_output()  # Optuna is imported now: its trial log follows the command's level
    optuna_storage = open_storage(url)  # a bad URL fails here, before any MLflow run
    artifacts = artifact_dir(url, sweep.name)
    uri = records.tracking_uri(tracking_uri)
    # Prepare the data once, here: workers would otherwise race to build the same cache.
    open_data(sweep.config(sweep.variants[0], sweep.lr_bounds()[0], sweep.seeds[0]))
    records.check_writable(uri, max(count_params(sweep.config(
        variant, sweep.lr_bounds()[0], sweep.seeds[0]))["total"] for variant in sweep.variants))
    check_table = None
    if check:
        check_table = lab_check.check_before_training(sweep.preset, list(sweep.variants),
                                                      override_pairs(sweep.overrides), quiet,
                                                      force=check == "force")

    remaining, parents, studies = {}, {}, {}
    status, pool = "FAILED", None
    with stop_on_signals(), ExitStack() as beats:  # SIGINT, SIGTERM: the trials' runs end KILLED
        try:
            # Runs a SIGKILLed sweep left RUNNING (its parents, a trial's run whose trial the
            # storage no longer holds); the trials themselves: fail_stale_trials below.
            end_dead_runs(records.client(uri), sweep.name, "the sweep started again")
            for variant in sweep.variants:
                # This process only records and tells; a GridSampler's after_trial would
                # stop an optimize loop when a tell visits its last point (fail_stale_trials).
                study = studies[variant] = open_study(
                    sweep, variant, optuna_storage, sampler=optuna.samplers.RandomSampler())
                for key, value in (("sweep", sweep.name), ("variant", variant),
                                   ("preset", sweep.preset)):
                    study.set_user_attr(key, value)
                stale = fail_stale_trials(study, uri, sweep.name)
                remaining[variant] = max(0, n_trials - _done(study))
                queued = retry_failed_trials(study, remaining[variant])
                if (stale or queued) and not quiet:
                    print(f"[{study.study_name}] {stale} trial(s) of a killed worker marked "
                          f"failed; {queued} failed trial(s) queued again with their parameters")
                parents[variant] = parent_run(sweep, variant, uri, url)  # RUNNING from here
                beats.enter_context(records.heartbeat(records.client(uri), parents[variant]))
                if check_table is not None:  # the check that vouches for these trials
                    records.log_check_table(records.client(uri), parents[variant],
                                             check_table)
            if not quiet:
                for variant in sweep.variants:
                    print(f"[{sweep.study_name(variant)}] {remaining[variant]} trial(s) to run; "
                          f"storage {_redact(url)}; MLflow parent run {parents[variant]}",
                          flush=True)
            tasks = trial_tasks(remaining)
            workers = max(1, min(workers, len(tasks)))
            # Workers may run elsewhere than this working directory (the forkserver's).
            ctx = SweepContext(sweep, url if "://" in url else str(Path(url).resolve()), uri,
                               parents, quiet, str(artifacts))
            if workers == 1:
                torch.set_num_threads(threads_per_worker(1))
                for task in tasks:
                    run_trial_task(task, ctx, notify=lambda info: None)
            else:
                pool = TrialPool(gpu_slots(gpus, workers), threads_per_worker(workers), ctx,
                                 studies)
                pool.run(tasks, on_outcome=lambda outcome: None,
                         on_dispatch=lambda task, slot: None)
                pool.close()
            status = "FINISHED"
        except BaseException as err:
            stop = interruption(err)
            if pool is not None:  # each worker ends its trial's run KILLED for the same signal
                pool.close(stop.signum if stop is not None else None)
            if stop is None:
                raise
            status = "KILLED"
            note_killed(len(parents))
            for run_id in parents.values():
                records.client(uri).set_tag(run_id, records.KILLED_REASON_TAG,
                                             f"stopped by {stop.name}")
            raise stop from None
        finally:
            mlflow_client = records.client(uri)
            for run_id in parents.values():
                mlflow_client.set_terminated(run_id, status)
    summaries = summarize_sweep(sweep.name, url, variants=list(sweep.variants))
    for variant, summary in summaries.items():
        for name, value in (("best/lr", summary.best_lr), ("best/val_loss", summary.best_loss),
                            ("max_stable/lr", summary.max_stable_lr)):
            if value is not None:
                records.client(uri).log_metric(parents[variant], name, value)
    return summaries


# --- analysis -----------------------------------------------------------------------

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
        raise LabError(f"sweep: no studies named {prefix}<variant> in {_redact(url)}")
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

