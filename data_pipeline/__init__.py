"""Teacher-logit dumps -> aligned top-k records -> grain batches."""
