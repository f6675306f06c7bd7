"""Training: the trainer, losses, sampling, checkpoints, the run folder, process launch, the
memory plan and the export to a pruned model folder."""
