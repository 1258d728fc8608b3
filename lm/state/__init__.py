"""A run's state: where its starting weights come from (init.from, resolved once), building the model
and optimizer on a mesh, checkpoints, and agreement across processes."""
