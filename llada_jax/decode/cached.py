"""KV-cached decoding for a causal teacher: prefill once, then a few tokens per call.

    lm = CachedLM(model, batch_size=B, max_length=S)       # S slots per row, preallocated
    logits_bv = lm.prefill(tokens_bw, pad_b)               # left-padded prompts -> next-token
    logits_bkv = lm.extend(tokens_bk)                      # append k tokens to every row
    lm.rollback(lengths_b)                                 # keep the first lengths_b tokens
    lm.lengths                                             # np.int32 [B]: tokens per row

`extend(tokens_bk)` returns float32 [B, k, V]: index j is the next-token distribution after
tokens_bk[:, j]. This is a verifier's call: with the logits of the previous call (the
distribution for the first drafted token) and extend(draft_bk), the target model has scored
all k drafted tokens plus the bonus position in one call. After rejections, `rollback` lowers
each row's length (a pointer per row: nothing is copied, slots past it are overwritten by the
next extend). Lengths count real tokens (prompt + appended), not the left padding.

Shapes are static: `extend` compiles once per (B, k, S) (for generation: one prefill per
prompt-length bucket and one k=1 step). Under a mesh the cache is sharded like the activations
(rows over `data`/`fsdp`, KV heads over `tensor`, sharding.py rules) and the params keep theirs;
host inputs go in replicated, so a mesh over several processes (hosts.py) works the same way:
every process makes the same calls with the same values. The step donates the cache, so it is
updated in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import sharding
from llada_jax.model.modeling import KVCache, LLaDAModel, init_cache
from llada_jax.errors import UserError


class CacheError(UserError):
    """A call that does not fit the cache (too long, wrong batch, rollback forward)."""


_init_cache = jax.jit(init_cache, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnames=("graphdef", "all_logits"), donate_argnames=("cache",))
def extend_step(graphdef, state, cache: KVCache, tokens_bk, *, all_logits: bool):
    """The jitted call under CachedLM (and the TPU decode plan): (logits, cache), cache donated."""
    return nnx.merge(graphdef, state).extend(tokens_bk, cache, all_logits=all_logits)


class CachedLM:
    """A causal model with a preallocated KV cache for `batch_size` rows (module docstring)."""

    def __init__(self, model: LLaDAModel, batch_size: int, max_length: int,
                 mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | None = None):
        if not model.cfg.causal:
            raise CacheError("a KV cache needs a causal model (config.json llada_jax.causal)")
        self.graphdef, self.state = nnx.split(model)
        self.batch_size, self.max_length = batch_size, max_length
        self.mesh, self.rules = mesh, rules or sharding.DEFAULT_RULES
        with self.mesh_context():
            self.cache = _init_cache(model.cfg, batch_size, max_length)
        self._start = np.zeros(batch_size, np.int32)
        self._slots = np.zeros(batch_size, np.int32)  # filled slots per row, padding included

    @property
    def lengths(self) -> np.ndarray:
        return self._slots - self._start

    def mesh_context(self):
        """The mesh and rules the step runs under (a null context without a mesh)."""
        return sharding.mesh_context(self.mesh, self.rules)

    def put(self, x) -> jax.Array:
        """A host array as the step's input (sharding.put_replicated); a jax.Array passes as
        it is."""
        return x if isinstance(x, jax.Array) else sharding.put_replicated(x, self.mesh)

    def prefill(self, tokens_bw, pad_b) -> jax.Array:
        """Starts every row afresh from a left-padded prompt (row b's tokens at columns
        pad_b..W-1); returns the next-token logits float32 [B, V] after each prompt."""
        pad_b = np.asarray(pad_b, np.int32)
        self._start[:], self._slots[:] = pad_b, 0
        self.cache = self.cache._replace(start_b=self.put(pad_b),
                                         length_b=self.put(np.zeros_like(pad_b)))
        return self._run(tokens_bw, all_logits=False)[:, 0]

    def extend(self, tokens_bk) -> jax.Array:
        """Appends k tokens to every row; logits float32 [B, k, V] (module docstring)."""
        return self._run(tokens_bk, all_logits=True)

    def rollback(self, lengths_b) -> None:
        """Keeps only the first lengths_b tokens of each row (<= its current length)."""
        lengths_b = np.asarray(lengths_b, np.int32)
        if lengths_b.shape != (self.batch_size,) or (lengths_b > self.lengths).any() or (lengths_b < 1).any():
            raise CacheError(f"rollback to {lengths_b.tolist()}: need {self.batch_size} lengths, "
                             f"each between 1 and the row's current length {self.lengths.tolist()}")
        self._slots = self._start + lengths_b
        self.cache = self.cache._replace(length_b=self.put(self._slots))

    def _run(self, tokens_bk, all_logits: bool) -> jax.Array:
        tokens_bk = self.put(tokens_bk if isinstance(tokens_bk, jax.Array)
                             else np.asarray(tokens_bk, np.int32)).astype(jnp.int32)
        batch, k = tokens_bk.shape
        if batch != self.batch_size or self._slots.max() + k > self.max_length:
            raise CacheError(f"{k} more tokens for {batch} rows do not fit the cache "
                             f"({self.batch_size} rows of {self.max_length} slots, fullest row at "
                             f"{self._slots.max()})")
        with self.mesh_context():
            logits, self.cache = extend_step(self.graphdef, self.state, self.cache, tokens_bk,
                                         all_logits=all_logits)
        self._slots += k
        return logits

