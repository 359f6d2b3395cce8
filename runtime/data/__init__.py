"""runtime/data/: Training data: sources and record kinds, tokenisation, hold-out and partitions, batches."""
