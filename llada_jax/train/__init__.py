"""Training: the config schema, diffusion masking, the chunked distillation loss, AdamW, the
sharded train step, the trainer loop with its checkpoints, and TPU ahead-of-time compiles."""
