"""What runs many runs: grid and sweep files (one schema), their overrides, the worker pool
that pins each worker to a GPU and says which work a dead worker held, the ablation grid and
the Optuna learning-rate sweep (docs/architecture.md)."""
