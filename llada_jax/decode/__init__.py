"""Causal decoding pieces shared by the teacher generator and speculative decoding: the
KV-cached LM (`cached.CachedLM`), next-token sampling and the length buckets."""
