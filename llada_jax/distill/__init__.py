"""The distillation objective, shared by training and evaluation: diffusion masking, the
divergences over the teacher's top-k + tail buckets, the chunked LM head, the loss and its
config (`LossConfig`), and the held-out drafter metrics."""
