"""Training: data to the model, the loop with cyclic LR and selective freezing, checkpoints."""
