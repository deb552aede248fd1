"""The trainer: config, CLI, data, training loop, checkpoints, metrics, eval, export."""
