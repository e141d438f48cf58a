"""The causal teacher: generation of teacher distributions (seed format) from prompts."""
