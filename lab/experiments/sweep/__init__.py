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

The package's modules, in the order they import each other:
- `spec.py`: the sweep file, read and validated (`Sweep`, `load_sweep`);
- `storage.py`: the Optuna storage (a journal file or an RDB URL) and the artifact folder;
- `results.py`: each study's summary (best LR, max stable LR), what a grid's
  `lrs: {from_sweep:}` and `gatelab sweep-report` read;
- `studies.py`: sampler, pruner, a study opened, and the trials of a killed sweep failed and
  queued again;
- `trials.py`: one trial = one training run, and the pool's trial tasks;
- `run.py`: `gatelab sweep` (`run_sweep`).
"""
