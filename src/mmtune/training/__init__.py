"""Training components: run directories, checkpoints and the run adapter."""
