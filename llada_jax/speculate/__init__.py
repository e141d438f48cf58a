"""Speculative decoding: a LLaDA drafter for a causal teacher (engine.py: the compiled engine)."""
