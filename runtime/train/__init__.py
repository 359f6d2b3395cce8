"""runtime/train/: The recipe: run options, the one round loop, the one split step, parties, checkpoints, re-planning."""
