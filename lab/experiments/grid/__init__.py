"""The ablation grid: a YAML file -> validated cells -> workers -> one MLflow run per cell.

A grid file (`ablations/*.yaml`) names the experiment, the preset, the data, the token
budget, the variants, the seeds, the learning rates and config overrides. Every cell
(variant x lr x seed) is resolved through `lab.config.resolve` and its data opened before
anything is written to MLflow, so a typo costs nothing.

MLflow layout: one experiment per grid name; one parent run per grid (found again on a
rerun); one child run per cell named `variant/lr=.../seed=...`, tagged variant, lr, seed,
preset and config_hash (the hash of the fully resolved config: the cell's identity). The
parent itself is one per grid name: created under a lock beside a SQLite store, and settled
by lab.records.find_or_create_run on other stores.

The package's modules, in the order they import each other:
- `spec.py`: the grid file's cells, resolved and validated, and a shard's share of them;
- `estimate.py`: cells per GPU (`--runs-per-gpu auto`) and the time estimate (`--dry-run`);
- `claims.py`: what each cell needs from the store (resume) and the claim one process
  trains it under;
- `cells.py`: one cell trained, in this process, a pool worker or a DDP job;
- `plots.py`: the plots of a pool worker's cells, drawn by the grid's own process;
- `run.py`: the grid (`run_grid`): options, the parent run, the cells dispatched, the summary.

Worker processes watch the grid process's identity and end within a second of it, so a
SIGKILLed grid leaves no orphan writing to the store.
"""
