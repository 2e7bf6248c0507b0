"""Training components: the one loop, its config, data and model building, scoring, checkpoints,
run directories and the run adapter."""
