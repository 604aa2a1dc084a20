"""The distillation loop: configuration, the step, checkpoints, the teacher and its cache."""
