"""The training-loop hook: CheckpointManager, its save and retention policies, the catalog of steps, RNG state."""
