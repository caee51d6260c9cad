"""Training: the Lightning module and data module, the step schedule, the callbacks a run
carries (loss history, spikes, divergence, throughput, checkpoints) and `train_run`, one run
end to end into its MLflow record (lab/records/)."""
