"""The speculative decoding engine: batched, compiled, one jitted call per block.

    engine = SpeculativeEngine(drafter_model, teacher_model, EngineBridge.from_vocab_bridge(b),
                               EngineSettings(gamma=4), stop_ids={eos})
    rows = engine.generate(prompts)          # [{"ids", "blocks", "target_calls", ...}] per prompt
    alone = engine.teacher_only(prompts)     # the fair baseline: same engine, k = 1 per token

A block, for B rows at once (finished rows masked out), in ONE compiled call:
  drafter forward(s) over the student context + γ masks + trailing masks (or, with the prefix
  cache, over only the window of new verified tokens + masks against the cached keys) ->
  device-side bridge (id table, allowed mask) -> the teacher's cached call on γ + 1 tokens (the
  last emitted token + the draft) -> acceptance (step.py) -> cache lengths.
The host gets back the ≤ γ + 1 new ids per row and two counts, and sends one small int32 array
(the student window and four numbers per row).

Static shapes: attention reads only the first `limit` cache slots, a bucket from LADDER chosen
on the host per block from the longest row, so a step costs what the filled part needs; every
bucket a run can reach is compiled before the first block (`warm_up`), so timings hold no
compilation. The drafter's prefix cache (Fast-dLLM) keeps the verified prefix's keys and
values: refreshed by a full forward every `refresh_every` blocks or once the prefix grew by
`refresh_tokens` tokens, rolled back when a re-tokenised tail changed its last ids.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from llada_jax import sharding
from llada_jax.errors import SpeculateError
from llada_jax.model.modeling import init_cache
from llada_jax.speculate import step as st
from llada_jax.speculate.context import TAIL_MAX

LADDER_BASE = 64       # attention limits: 64, 128, 256, ... (capped at the allocation)
PROMPT_MULTIPLE = 16   # the teacher's prefill width rounds up to this
DRAFTER_CACHES = ("none", "prefix")
_COMPILED: dict = {}   # every engine's executables (SpeculativeEngine._compile)
_init_cache = jax.jit(init_cache, static_argnums=(0, 1, 2))


def _replicated(x):
    """Row vectors stay replicated under a mesh, so every call's inputs have the shardings the
    executables were compiled for (their first inputs come from the host)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())


def _settled(cache):
    return None if cache is None else cache._replace(start_b=_replicated(cache.start_b),
                                                     length_b=_replicated(cache.length_b))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    gamma: int = 4                  # drafted tokens per block
    trailing_masks: int = 4         # masks after the block (never filled): text goes on
    steps: int = 1                  # denoising steps per block
    greedy: bool = True
    temperature: float = 1.0        # the teacher's (sampled mode)
    draft_temperature: float | None = None  # None: 0 when greedy, else `temperature`
    max_new_tokens: int = 32
    batch_size: int = 8
    drafter_cache: str = "none"     # "none" | "prefix"
    refresh_every: int = 8          # prefix cache: full forward every R blocks ...
    refresh_tokens: int = 64        # ... or once the prefix grew by M student tokens
    draft_confidence: float | None = None  # stop a draft at top probability < c
    seed: int = 0

    def problems(self) -> list[str]:
        """What is wrong with these settings, as flag names a user can fix."""
        out = []
        if self.gamma < 1 or not 1 <= self.steps <= self.gamma:
            out.append("need --gamma >= 1 and 1 <= --steps <= --gamma")
        if self.max_new_tokens < 1 or self.trailing_masks < 0 or self.batch_size < 1:
            out.append("need --max-new-tokens >= 1, --trailing-masks >= 0, --batch-size >= 1")
        if self.drafter_cache not in DRAFTER_CACHES:
            out.append(f"--drafter-cache {self.drafter_cache!r}: choose none or prefix")
        if self.refresh_every < 1 or self.refresh_tokens < 1:
            out.append("need --refresh-every >= 1 and --refresh-tokens >= 1")
        if self.draft_confidence is not None and not 0 <= self.draft_confidence <= 1:
            out.append("--draft-confidence must lie in [0, 1]")
        if not self.greedy and self.temperature <= 0 or (self.draft_temperature or 0) < 0:
            out.append("temperatures must be > 0 for sampling (>= 0 for drafting)")
        return out

    @property
    def draft_t(self) -> float:
        if self.draft_temperature is not None:
            return self.draft_temperature
        return 0.0 if self.greedy else self.temperature

    @property
    def window_new(self) -> int:
        """Uncached verified student tokens a prefix-cache window holds (more: a refresh)."""
        return self.gamma + 1 + TAIL_MAX


def ladder(need: int, cap: int) -> int:
    """The smallest bucket LADDER_BASE * 2^k >= need, at most cap."""
    size = LADDER_BASE
    while size < need:
        size *= 2
    return min(size, cap)


def _gather_rows(hidden_bld, cols_bg):
    return jnp.take_along_axis(hidden_bld, cols_bg[..., None], axis=1)


def draft_part(d_gd, d_state, allowed, d_cache, packed, key, *, s: EngineSettings, width: int,
               window: bool, d_limit: int):
    """The drafter's side of a block: (ids, conf, logq, exact, new drafter cache).

    packed int32 [B, width + 4]: student tokens (the whole context + masks, or a prefix-cache
    window), then n (context tokens before the masks; in a window: the uncached ones), c
    (cached tokens), limit, active. d_cache None: no prefix cache (a plain full forward).
    With it, a full forward (window False) refills it; a window attends to its first d_limit
    slots and appends the window's new verified tokens."""
    model = nnx.merge(d_gd, d_state)
    tokens, n_b, c_b = packed[:, :width], packed[:, width], packed[:, width + 1]
    cols = n_b[:, None] + jnp.arange(s.gamma)[None, :]
    visible = jnp.arange(width)[None, :] < (n_b + s.gamma + s.trailing_masks)[:, None]
    kept = [d_cache]

    def logits_fn(tokens_bl):
        if d_cache is None:
            hidden = model(tokens_bl, attention_mask_bl=visible, return_hidden=True)
        else:
            cached = c_b if window else jnp.zeros_like(c_b)
            cache = d_cache._replace(start_b=jnp.zeros_like(c_b), length_b=cached)
            new_bqk = jnp.broadcast_to(visible[:, None, :], (len(n_b), width, width))
            hidden, cache = model.forward_cached(tokens_bl, cache,
                                                 cached[:, None] + jnp.arange(width)[None, :],
                                                 new_bqk, kv_limit=d_limit)
            kept[0] = cache._replace(length_b=cached + n_b)
        return model.logits(_gather_rows(hidden, cols))[..., :allowed.shape[0]]

    ids, conf, logq, exact = st.draft(logits_fn, tokens, cols, allowed, key, steps=s.steps,
                                      temperature=s.draft_t)
    return ids, conf, logq, exact, kept[0]


def verify_part(t_gd, t_state, to_teacher, allowed, t_cache, last_b, ids, conf, logq, exact,
                limit_b, active_b, key, *, s: EngineSettings, t_limit: int):
    """The teacher's side: bridge, one cached call on γ + 1 tokens, acceptance, cache length.
    Returns (out int32 [B, γ + 3]: emitted ids (-1 after), count, proposed; cache; last)."""
    model = nnx.merge(t_gd, t_state)
    vocab = model.cfg.vocab_size
    draft_t = to_teacher[ids]
    valid = st.valid_positions(conf, limit_b, s.draft_confidence)
    tokens = jnp.concatenate([last_b[:, None], draft_t], axis=1)
    old = t_cache.length_b
    logits, t_cache = model.extend(tokens, t_cache, kv_limit=t_limit)
    logits = logits[..., :vocab]
    if s.greedy:
        n, token = st.accept_greedy(logits, draft_t, valid)
    else:
        n, token = st.accept_sampled(logits, draft_t, valid,
                                     *_draft_laws(ids, draft_t, logq, exact, to_teacher, allowed,
                                                  vocab), s.temperature, key)
    out, count = st.emitted(draft_t, n, token, active_b)
    t_cache = t_cache._replace(length_b=old + count)
    last_b = jnp.where(active_b, token, last_b)
    stats = jnp.stack([count, jnp.sum(valid, axis=1).astype(jnp.int32)], axis=1)
    return jnp.concatenate([out, stats], axis=1), t_cache, last_b


def _draft_laws(ids, draft_t, logq, exact, to_teacher, allowed, vocab):
    """(log q_j(x_j) [B, γ] (0 for a point mass), q_row_fn(n) -> the law at n in teacher ids)."""
    gamma = ids.shape[1]
    if logq is None:
        return jnp.zeros(ids.shape, jnp.float32), lambda n: _one_hot_at(draft_t, n, vocab)
    logq_x = jnp.where(exact, jnp.take_along_axis(logq, ids[..., None], axis=2)[..., 0], 0.0)
    into = jnp.where((to_teacher >= 0) & allowed, to_teacher, vocab)  # vocab: dropped

    def q_row(n):
        j = jnp.minimum(n, gamma - 1)
        q_s = jnp.exp(jnp.take_along_axis(logq, j[:, None, None], axis=1)[:, 0])
        q_t = jnp.zeros((len(n), vocab + 1), jnp.float32).at[:, into].add(q_s)[:, :vocab]
        here = jnp.take_along_axis(exact, j[:, None], axis=1)
        return jnp.where(here, q_t, _one_hot_at(draft_t, n, vocab))
    return logq_x, q_row


def _one_hot_at(draft_t, n, vocab):
    j = jnp.minimum(n, draft_t.shape[1] - 1)
    return jax.nn.one_hot(jnp.take_along_axis(draft_t, j[:, None], axis=1)[:, 0], vocab)


def block_step(d_gd, t_gd, d_state, t_state, tables, d_cache, t_cache, last_b, packed, key, *,
               s: EngineSettings, width: int, window: bool, d_limit: int, t_limit: int):
    """One whole block (draft_part then verify_part): (out, d_cache, t_cache, last, key)."""
    to_teacher, allowed = tables
    key, k_draft, k_verify = jax.random.split(key, 3)
    ids, conf, logq, exact, d_cache = draft_part(d_gd, d_state, allowed, d_cache, packed,
                                                 k_draft, s=s, width=width, window=window,
                                                 d_limit=d_limit)
    out, t_cache, last_b = verify_part(t_gd, t_state, to_teacher, allowed, t_cache, last_b, ids,
                                       conf, logq, exact, packed[:, width + 2],
                                       packed[:, width + 3].astype(bool), key=k_verify, s=s,
                                       t_limit=t_limit)
    return _replicated(out), _settled(d_cache), _settled(t_cache), _replicated(last_b), key


def teacher_step(t_gd, t_state, t_cache, last_b, active_b, key, *, s: EngineSettings,
                 t_limit: int):
    """The baseline's step: one cached k = 1 call per token. (ids [B] (-1 finished), ...)."""
    model = nnx.merge(t_gd, t_state)
    key, sub = jax.random.split(key)
    logits, t_cache = model.extend(last_b[:, None], t_cache, kv_limit=t_limit)
    logits = logits[:, 0, :model.cfg.vocab_size]
    token = (jnp.argmax(logits, axis=-1) if s.greedy
             else jax.random.categorical(sub, logits / s.temperature, axis=-1)).astype(jnp.int32)
    t_cache = t_cache._replace(length_b=t_cache.length_b - 1 + active_b.astype(jnp.int32))
    return (_replicated(jnp.where(active_b, token, -1)), _settled(t_cache),
            _replicated(jnp.where(active_b, token, last_b)), key)


def prefill_step(t_gd, t_state, t_cache, tokens_bw, pad_b, *, t_limit: int):
    """Fills the teacher cache with left-padded prompts (all but their last token)."""
    cache = t_cache._replace(start_b=pad_b, length_b=jnp.zeros_like(pad_b))
    return _settled(nnx.merge(t_gd, t_state).extend(tokens_bw, cache, all_logits=False,
                                                    kv_limit=t_limit)[1])


@dataclasses.dataclass
class _Row:
    """One prompt's decoding state on the host."""
    teacher_ids: list[int]
    context: object                 # context.IdRow / TextRow: the student ids
    active: bool = True
    out: list[int] = dataclasses.field(default_factory=list)
    blocks: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    t_len: int = 0                  # teacher cache slots filled (left padding included)
    cached: int = 0                 # drafter prefix cache: student tokens cached
    at_refresh: int = 0             # student tokens when the cache was last refreshed


class SpeculativeEngine:
    """Speculative decoding of a LLaDA drafter for a causal teacher (module docstring)."""

    def __init__(self, drafter_model, teacher_model, bridge, settings: EngineSettings,
                 mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | None = None,
                 stop_ids=()):
        problems = settings.problems()
        if problems:
            raise SpeculateError("; ".join(problems))
        if not teacher_model.cfg.causal:
            raise SpeculateError("the teacher is not causal (config.json llada_jax.causal is "
                                 "false): speculate verifies with a causal LM")
        if drafter_model.cfg.mask_token_id is None:
            raise SpeculateError("the drafter has no mask_token_id (config.json): it cannot draft")
        self.s, self.bridge, self.stop_ids = settings, bridge, set(stop_ids)
        self.mesh, self.rules = mesh, rules or sharding.DEFAULT_RULES
        self.d_cfg, self.t_cfg = drafter_model.cfg, teacher_model.cfg
        self.d_gd, self.d_state = self._place(drafter_model)
        self.t_gd, self.t_state = self._place(teacher_model)
        self.tables = self._tables(bridge)
        self._mine: dict = {}  # this engine's executables (_compile)
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ placement, tables
    def _place(self, model):
        graphdef, state = nnx.split(model)
        if self.mesh is not None:
            state = jax.device_put(state, sharding.param_shardings(state, self.mesh, self.rules))
        else:  # one device for both models (a trainer may hand over params sharded over a mesh)
            state = jax.device_put(state, jax.local_devices()[0])
        return graphdef, state

    def _tables(self, bridge):
        vs, vt = self.d_cfg.vocab_size, self.t_cfg.vocab_size
        to_teacher = np.full(vs, -1, np.int32)
        n = min(vs, len(bridge.to_teacher))
        to_teacher[:n] = bridge.to_teacher[:n]
        to_teacher[to_teacher >= vt] = -1
        allowed = np.zeros(vs, bool)
        allowed[:n] = np.asarray(bridge.allowed[:n], bool)
        allowed &= to_teacher >= 0
        allowed[self.d_cfg.mask_token_id] = False
        if not allowed.any():
            raise SpeculateError("no drafter token has a teacher token of the same bytes: the "
                                 "vocabularies share nothing (check the tokenizers)")
        return self.put(to_teacher), self.put(allowed)

    def mesh_context(self):
        return sharding.mesh_context(self.mesh, self.rules)

    def put(self, x) -> jax.Array:
        """A host array, replicated over the mesh (or on the default device)."""
        return sharding.put_replicated(x, self.mesh)

    # ------------------------------------------------------------------ plan and compile
    def _plan(self, rows: list[_Row]) -> None:
        """Buffer sizes for these prompts; every bucket they can reach is compiled now."""
        s = self.s
        longest = max(len(r.teacher_ids) for r in rows)
        self.prompt_width = _round_up(max(longest - 1, 1), PROMPT_MULTIPLE)
        self.t_slots = _round_up(self.prompt_width + s.max_new_tokens + s.gamma + 1, LADDER_BASE)
        self.window = s.window_new + s.gamma + s.trailing_masks
        # The student context grows about as the teacher's, times the tokenizers' ratio.
        ratio = max(1.0, max(len(r.context.ids) / len(r.teacher_ids) for r in rows))
        reach = (max(len(r.context.ids) for r in rows) + int(1.5 * ratio * s.max_new_tokens)
                 + TAIL_MAX + s.gamma + s.trailing_masks)
        with self.mesh_context():
            self.t_cache = self._fresh(_init_cache(self.t_cfg, s.batch_size, self.t_slots))
        self._allocate_drafter(ladder(reach, 1 << 30))
        shortest = min(len(r.context.ids) for r in rows) + s.gamma + s.trailing_masks
        for k in range(self._bucket_index(min(self.prompt_width, shortest)),
                       self._bucket_index(max(self.t_slots, reach)) + 1):
            self._block(False, k)
            if s.drafter_cache == "prefix":
                self._block(True, k)
            self._teacher(k)
        self._prefill()

    def _fresh(self, cache):
        """An empty cache whose row vectors are host-made (replicated), as the steps keep them."""
        zeros = np.zeros(self.s.batch_size, np.int32)
        return cache._replace(start_b=self.put(zeros), length_b=self.put(zeros))

    def _allocate_drafter(self, s_cap: int) -> None:
        """The student's length cap and the drafter cache (s_cap + a window per row)."""
        self.s_cap, b = s_cap, self.s.batch_size
        with self.mesh_context():
            self.d_cache = (self._fresh(_init_cache(self.d_cfg, b, self.s_cap + self.window))
                            if self.s.drafter_cache == "prefix" else None)

    @staticmethod
    def _bucket_index(need: int) -> int:
        return max(0, int(np.ceil(np.log2(max(need, 1) / LADDER_BASE))))

    def _limits(self, k: int) -> tuple[int, int]:
        """(teacher limit, student limit) of bucket k."""
        size = LADDER_BASE << k
        return min(size, self.t_slots), min(size, self.s_cap)

    def _compile(self, key, fn, args, donate):
        """The executable for `key`, lowered and compiled on first use. Engines share them
        (the same models' structure, settings and shapes compile the same program); each
        engine keeps its own by key too (hashing a graphdef every block would cost)."""
        if key in self._mine:
            return self._mine[key]
        full = key + (self.d_gd, self.t_gd, self.mesh, tuple(self.rules), self.s.batch_size)
        if full not in _COMPILED:
            t = time.perf_counter()
            with self.mesh_context():
                _COMPILED[full] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t
        self._mine[key] = _COMPILED[full]
        return self._mine[key]

    def _block(self, window: bool, k: int):
        t_limit, s_limit = self._limits(k)
        width = self.window if window else s_limit
        mine = ("block", window, width, s_limit, t_limit, self.t_slots, self.s_cap)
        if mine in self._mine:
            return self._mine[mine], width
        fn = functools.partial(block_step, self.d_gd, self.t_gd, s=self.s, width=width,
                               window=window, d_limit=s_limit if window else 0, t_limit=t_limit)
        packed = self.put(np.zeros((self.s.batch_size, width + 4), np.int32))
        args = (self.d_state, self.t_state, self.tables, self.d_cache, self.t_cache,
                self.put(np.zeros(self.s.batch_size, np.int32)), packed, jax.random.key(0))
        code = dataclasses.replace(self.s, seed=0, max_new_tokens=0, refresh_every=1,
                                   refresh_tokens=1)
        self._mine[mine] = self._compile(mine + (code,), fn, args, (3, 4))
        return self._mine[mine], width

    def _teacher(self, k: int):
        if ("teacher", k, self.t_slots) in self._mine:
            return self._mine[("teacher", k, self.t_slots)]
        fn = functools.partial(teacher_step, self.t_gd, s=self.s, t_limit=self._limits(k)[0])
        b = self.s.batch_size
        args = (self.t_state, self.t_cache, self.put(np.zeros(b, np.int32)),
                self.put(np.zeros(b, bool)), jax.random.key(0))
        key = ("teacher", self.s.greedy, self.s.temperature, self._limits(k)[0], self.t_slots)
        self._mine[("teacher", k, self.t_slots)] = self._compile(key, fn, args, (1,))
        return self._mine[("teacher", k, self.t_slots)]

    def _prefill(self):
        fn = functools.partial(prefill_step, self.t_gd, t_limit=0)
        b = self.s.batch_size
        args = (self.t_state, self.t_cache, self.put(np.zeros((b, self.prompt_width), np.int32)),
                self.put(np.zeros(b, np.int32)))
        return self._compile(("prefill", self.prompt_width, self.t_slots), fn, args, (1,))

    # ------------------------------------------------------------------ decoding
    def _start(self, prompts) -> list[_Row]:
        rows = [_Row(*self.bridge.start(p)) for p in prompts]
        for i, row in enumerate(rows):
            if not row.teacher_ids:
                raise SpeculateError(f"prompt {i} is empty for the teacher tokenizer (no BOS "
                                     f"either): give it some text")
        return rows

    def _batches(self, rows: list[_Row]):
        """Batches of batch_size rows; the last one padded with finished copies."""
        b = self.s.batch_size
        for i in range(0, len(rows), b):
            batch = rows[i:i + b]
            pad = [_Row(batch[0].teacher_ids, None, active=False) for _ in range(b - len(batch))]
            yield batch, batch + pad

    def _prefill_batch(self, rows: list[_Row]) -> jax.Array:
        """The teacher cache holds every prompt but its last token, which is returned: the
        first block's call starts with it."""
        width = self.prompt_width
        tokens = np.zeros((len(rows), width), np.int32)
        pad = np.zeros(len(rows), np.int32)
        for b, row in enumerate(rows):
            head = row.teacher_ids[:-1]
            pad[b] = width - len(head)
            tokens[b, pad[b]:] = head
            row.t_len = width
        with self.mesh_context():
            self.t_cache = self._prefill()(self.t_state, self.t_cache, self.put(tokens),
                                           self.put(pad))
        return self.put([row.teacher_ids[-1] for row in rows])

    def generate(self, prompts) -> list[dict]:
        """Speculative decoding of every prompt (texts, or teacher ids for an IdBridge): per
        prompt its teacher ids, blocks (proposed, accepted), target calls and seconds (its
        batch's decoding time over its rows; compilation happens before, in _plan)."""
        return self._timed(prompts, self.s.seed, self._decode, lambda r: {
            "ids": r.out, "blocks": r.blocks, "target_calls": len(r.blocks),
            "drafter_forward_passes": self.s.steps * len(r.blocks)})

    def _timed(self, prompts, seed: int, decode, result) -> list[dict]:
        """`decode(rows, key)` over the batches of `prompts` after every shape is compiled
        (_plan); per prompt `result(row)` and the seconds of its batch over its rows."""
        rows = self._start(prompts)
        self._plan(rows)
        key = jax.random.key(seed)
        results = []
        for batch, padded in self._batches(rows):
            key, sub = jax.random.split(key)
            t = time.perf_counter()
            decode(padded, sub)
            seconds = (time.perf_counter() - t) / len(batch)
            results += [{**result(r), "seconds": seconds} for r in batch]
        return results

    def _decode(self, rows: list[_Row], key) -> None:
        s = self.s
        last = self._prefill_batch(rows)
        blocks_since = s.refresh_every  # the first block fills the drafter cache
        while any(r.active for r in rows):
            window = s.drafter_cache == "prefix" and self._window_ok(rows, blocks_since)
            packed, k = self._pack(rows, window)
            fn, width = self._block(window, k)
            with self.mesh_context():
                out, self.d_cache, self.t_cache, last, key = fn(
                    self.d_state, self.t_state, self.tables, self.d_cache, self.t_cache, last,
                    self.put(packed), key)
            self._take(rows, np.asarray(out), window)
            blocks_since = blocks_since + 1 if window else 1

    def _window_ok(self, rows: list[_Row], blocks_since: int) -> bool:
        """Whether this block may run the window against the drafter cache (else: refresh)."""
        if blocks_since >= self.s.refresh_every:
            return False
        live = [r for r in rows if r.active]
        return all(len(r.context.ids) - r.cached <= self.s.window_new and r.cached <= self.s_cap
                   and len(r.context.ids) - r.at_refresh < self.s.refresh_tokens for r in live)

    def _pack(self, rows: list[_Row], window: bool) -> tuple[np.ndarray, int]:
        """The block's host input (draft_part's `packed`) and its bucket."""
        s, mask = self.s, self.d_cfg.mask_token_id
        live = [r for r in rows if r.active]
        t_need = max(r.t_len for r in live)
        if window:
            s_need, width = max(r.cached for r in live), self.window
        else:
            s_need = max(len(r.context.ids) for r in live) + s.gamma + s.trailing_masks
            if s_need > self.s_cap:  # longer than planned: bigger buffers (a compile, rare)
                self._allocate_drafter(ladder(2 * s_need, 1 << 30))
            width = None
        k = max(self._bucket_index(t_need), self._bucket_index(s_need))
        width = width or self._limits(k)[1]
        packed = np.full((len(rows), width + 4), mask, np.int32)
        packed[:, width:] = 0  # finished rows: nothing to draft, nothing accepted
        for b, row in enumerate(rows):
            if not row.active:
                continue
            ids = row.context.ids[row.cached:] if window else row.context.ids
            packed[b, :len(ids)] = ids
            room = s.max_new_tokens - len(row.out) - 1
            packed[b, width:] = (len(ids), row.cached if window else 0, min(s.gamma, room), 1)
        return packed, k

    def _take(self, rows: list[_Row], out: np.ndarray, window: bool) -> None:
        """Applies a block's result: emitted ids (cut at a stop id), cache bookkeeping."""
        g = self.s.gamma
        for b, row in enumerate(rows):
            if not row.active:
                continue
            count, proposed = out[b, g + 1:g + 3]
            new = out[b, :count].tolist()
            row.t_len += count
            row.blocks.append((int(proposed), int(count) - 1))
            cut = next((i + 1 for i, t in enumerate(new) if t in self.stop_ids), len(new))
            row.out += new[:cut]
            if self.s.drafter_cache == "prefix":  # the context before this block is cached now
                row.cached = len(row.context.ids)
                row.at_refresh = row.at_refresh if window else row.cached
            row.cached = min(row.cached, row.context.extend(new[:cut]))
            row.active = not (row.out and row.out[-1] in self.stop_ids) and len(row.out) < self.s.max_new_tokens

    def teacher_only(self, prompts) -> list[dict]:
        """The fair baseline: the teacher alone in this engine (batched, compiled, one cached
        k = 1 step per token, the same buckets). Per prompt: ids, target_calls, seconds."""
        return self._timed(prompts, self.s.seed + 1, self._decode_alone,
                           lambda r: {"ids": r.out, "target_calls": len(r.out)})

    def _decode_alone(self, rows: list[_Row], key) -> None:
        last = self._prefill_batch(rows)
        while any(r.active for r in rows):
            fn = self._teacher(self._bucket_index(max(r.t_len for r in rows if r.active)))
            with self.mesh_context():
                ids, self.t_cache, last, key = fn(self.t_state, self.t_cache, last,
                                                  self.put([r.active for r in rows]), key)
            for row, token in zip(rows, np.asarray(ids).tolist()):
                if row.active:
                    row.out.append(token)
                    row.t_len += 1
                    row.active = token not in self.stop_ids and len(row.out) < self.s.max_new_tokens
