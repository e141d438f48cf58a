"""Training: the config schema, the sharded train step, the trainer loop with its checkpoints,
the recipes `demo --compare-strategies` trains, and TPU ahead-of-time compiles."""
