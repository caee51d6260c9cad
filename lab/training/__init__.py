"""Training: the training step without Lightning (optimizer, compile, CUDA graphs) and the run's
corpus, the Lightning module and data module, the step schedule, the callbacks a run carries
(loss history, spikes, divergence, throughput, checkpoints) and `train_run`, one run end to
end into its MLflow record (lab/records/)."""
