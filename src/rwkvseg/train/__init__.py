"""Training: configuration, loop, checkpoints."""
