"""The distillation loss: the divergence over target positions, through the LM head in pieces.

Divergences over the buckets S ∪ {tail} are in `divergences`; the cuts of the LM head that keep
the [B, L, V] logits out of memory (sequence chunks with a closed-form gradient, vocabulary
tiles) in `chunked_head`. Results are (sum, count) pairs so they add up across microbatches and
hosts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from data_pipeline import alignment
from llada_jax.distill import chunked_head
from llada_jax.distill import divergences as div
from llada_jax.distill import masking
from llada_jax.errors import ConfigError

CHUNK_AXES = ("sequence", "vocab")
# How the loss weights each drafted offset j of a block (config field loss.position_weights;
# offsets come from masking.draft_blocks).
POSITION_WEIGHTS = ("uniform", "streak", "geometric")
# streak: the smoothed acceptance is floored here so an untrained student (alpha ~ 0 at every
# offset) still gives offsets past 0 a small, finite weight and the mean-1 scaling never divides
# by 0.
STREAK_ALPHA_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Everything the distillation objective is set by: the `loss` section of a training config,
    built and checked once (`from_config`) and passed whole to the train step and the loss.

    kind: a divergence of `divergences.KINDS` (beta: jsd's mixture weight; lk_decay: lk's
    weight exp(-lk_decay alpha)); temperature of both distributions. chunk_axis: how the LM
    head is cut ("sequence": chunks of chunk_size positions, head-gradient adds in tiles of
    vocab_tile columns; "vocab": tiles of vocab_tile columns). mask_mode / mask_eps: the
    positions masked and scored (`masking`); draft_*: the drafted blocks of mask_mode
    draft_blocks (block length draft_gamma, or U{draft_gamma..draft_gamma_max}; trailing masks;
    also score the visible prefix / the trailing masks; the fraction of segments left to the
    original masking). position_weights: how offsets of a drafted block weigh (`offset_weights`;
    geometric_ratio, streak_ema). intersection_vocab: the student restricted to the TLI
    intersection (`intersection_bias`).
    """
    kind: str = "kl"
    temperature: float = 1.0
    beta: float = 0.5
    lk_decay: float = 1.0
    chunk_axis: str = "sequence"
    chunk_size: int = 256
    vocab_tile: int = chunked_head.VOCAB_TILE
    mask_mode: str = "original"
    mask_eps: float = 1e-3
    position_weights: str = "uniform"
    geometric_ratio: float = 0.7
    streak_ema: float = 0.9
    draft_gamma: int = 4
    draft_gamma_max: int = 0
    draft_trailing: int = 4
    draft_score_prefix: bool = False
    draft_score_trailing: bool = False
    draft_original_fraction: float = 0.0
    intersection_vocab: bool = False

    @classmethod
    def from_config(cls, section) -> LossConfig:
        """From a config's `loss` section (a ConfigDict or a dict); a ConfigError listing every
        field that is wrong, unknown or does not fit with another."""
        cfg, problems = cls.check(section)
        if problems:
            raise ConfigError("invalid loss config (fix these with --config.loss.FIELD=VALUE "
                              "or in the config file):\n  " + "\n  ".join(problems))
        return cfg

    @classmethod
    def check(cls, section) -> tuple[LossConfig, list[str]]:
        """(the config of the known fields, every problem: unknown fields and `problems()`)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = dict(section)
        unknown = [f"loss.{k} is not a loss setting (known: {', '.join(sorted(fields))})"
                   for k in given if k not in fields]
        cfg = cls(**{k: v for k, v in given.items() if k in fields})
        return cfg, unknown + cfg.problems()

    def problems(self) -> list[str]:
        """Every choice, range and cross-field rule this config breaks (empty: none)."""
        choices = {"kind": div.KINDS, "chunk_axis": CHUNK_AXES, "mask_mode": masking.MODES,
                   "position_weights": POSITION_WEIGHTS, "intersection_vocab": (True, False),
                   "draft_score_prefix": (True, False), "draft_score_trailing": (True, False)}
        out = [f"loss.{k}={getattr(self, k)!r} is not one of {v}" for k, v in choices.items()
               if getattr(self, k) not in v]
        ranges = {"temperature": (lambda v: v > 0, "> 0"),
                  "beta": (lambda v: 0 < v < 1 or self.kind != "jsd", "in (0, 1)"),
                  "chunk_size": (lambda v: v > 0, "> 0"), "vocab_tile": (lambda v: v > 0, "> 0"),
                  "mask_eps": (lambda v: 0 <= v < 1, "in [0, 1)"),
                  "lk_decay": (lambda v: v >= 0, ">= 0"),
                  "geometric_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
                  "streak_ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
                  "draft_gamma": (lambda v: v > 0, "> 0"),
                  "draft_gamma_max": (lambda v: v >= 0, ">= 0 (0: always draft_gamma)"),
                  "draft_trailing": (lambda v: v >= 0, ">= 0"),
                  "draft_original_fraction": (lambda v: 0 <= v < 1, "in [0, 1)")}
        for k, (ok, want) in ranges.items():
            try:
                good = ok(getattr(self, k))
            except TypeError:
                good = False
            if not good:
                out.append(f"loss.{k}={getattr(self, k)!r} must be {want}")
        if self.position_weights != "uniform" and self.mask_mode != "draft_blocks":
            out.append(f"loss.position_weights={self.position_weights} weights the offsets of a "
                       f"drafted block: it needs loss.mask_mode=draft_blocks")
        return out

    @property
    def block_offsets(self) -> int:
        """The longest drafted block: how many offsets position weights cover."""
        return max(int(self.draft_gamma), int(self.draft_gamma_max))

    @property
    def tracked_offsets(self) -> int:
        """How many drafted offsets the train state tracks acceptance for (streak weights)."""
        return self.block_offsets if self.position_weights == "streak" else 0


def offset_weights(kind: str, acceptance_g: jax.Array | None, ratio: float, n_offsets: int
                   ) -> jax.Array:
    """float32 [n_offsets] weights of offsets 0..n-1 of a drafted block, scaled to mean 1 (so
    the loss keeps the uniform one's scale).

    'uniform': 1. 'geometric': ratio^j. 'streak' (D-PACE; SpecDiff-2's streak distillation):
    w_j = sum_{m >= j} prod_{i <= m} a_i with a the smoothed per-offset acceptance of the
    current student (acceptance_g, an EMA kept in the train state; negative = not measured
    yet, then uniform): offset j's token adds to the accepted length of every streak that
    reaches past it, and the streak reaches m with probability prod_{i <= m} a_i. It carries no
    gradient.
    """
    if kind not in POSITION_WEIGHTS:
        raise ValueError(f"unknown position weights {kind!r}: choose one of "
                         f"{', '.join(POSITION_WEIGHTS)} (config field loss.position_weights)")
    j = jnp.arange(n_offsets, dtype=jnp.float32)
    if kind == "uniform":
        return jnp.ones((n_offsets,), jnp.float32)
    if kind == "geometric":
        w = jnp.asarray(ratio, jnp.float32) ** j
    else:
        a = jnp.clip(jax.lax.stop_gradient(acceptance_g), STREAK_ALPHA_FLOOR, 1.0)
        w = jnp.cumsum(jnp.cumprod(a)[::-1])[::-1]
        w = jnp.where(jnp.any(acceptance_g < 0), 1.0, w)
    return w / jnp.mean(w)


def distill_loss(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                 teacher_logprobs_blk: jax.Array, loss_mask_bl: jax.Array, *, kind: str = "kl",
                 temperature: float = 1.0, chunk_size: int = 256, beta: float = 0.5,
                 lk_decay: float = 1.0, chunk_axis: str = "sequence",
                 vocab_tile: int = chunked_head.VOCAB_TILE, weights_bl: jax.Array | None = None,
                 offsets_bl: jax.Array | None = None, n_offsets: int = 0,
                 vocab_bias_v: jax.Array | None = None):
    """(sum over loss positions of weight * divergence, number of loss positions), both
    float32 []; with n_offsets > 0 also the student's acceptance alpha summed by offset
    (float32 [n_offsets], no gradient; offsets_bl int [B, L], -1 = none).

    hidden_bld [B, L, D] final hidden states (after ln_f, any float dtype); head_dv [D, V];
    teacher_ids_blk / teacher_logprobs_blk [B, L, K]; loss_mask_bl bool [B, L]; weights_bl
    float [B, L] position weights (default 1; no gradient); vocab_bias_v [V] added to the
    student's logits (-inf outside a sub-vocabulary, see `intersection_bias`).
    The mean loss is sum / count, with both summed over the global batch first. chunk_axis
    "sequence" cuts the LM head into chunks of `chunk_size` positions (adding the head gradient
    in tiles of `vocab_tile` columns), "vocab" into tiles of `vocab_tile` (`chunked_head`).
    """
    div.check_kind(kind, beta, lk_decay)
    count = jnp.sum(loss_mask_bl).astype(jnp.float32)
    weights_bl = (jnp.ones(loss_mask_bl.shape, jnp.float32) if weights_bl is None
                  else jax.lax.stop_gradient(weights_bl.astype(jnp.float32)))
    offsets_bl = (jnp.full(loss_mask_bl.shape, -1, jnp.int32) if offsets_bl is None
                  else offsets_bl)
    if chunk_axis == "sequence":
        opts = chunked_head.LossOpts(kind, float(temperature), float(beta), float(lk_decay),
                                     int(chunk_size), int(vocab_tile), int(n_offsets))
        total, alpha_g = chunked_head.sequence_loss(
            hidden_bld, head_dv, teacher_ids_blk, teacher_logprobs_blk, loss_mask_bl,
            weights_bl, offsets_bl, vocab_bias_v, opts)
    elif chunk_axis == "vocab":
        stats = chunked_head.vocab_tiled_stats(
            hidden_bld, head_dv, teacher_ids_blk, teacher_logprobs_blk > div.NEG_INF,
            temperature=temperature, vocab_tile=vocab_tile, with_top1=False, bias_v=vocab_bias_v)
        logp, logq = div.bucket_logprobs_from_stats(stats, teacher_logprobs_blk, temperature)
        total, alpha_g = _weighted_sums(logp, logq, loss_mask_bl, weights_bl, offsets_bl,
                                        kind, beta, lk_decay, n_offsets)
    else:
        raise ValueError(f"unknown chunk axis {chunk_axis!r}: choose one of "
                         f"{', '.join(CHUNK_AXES)} (config field loss.chunk_axis)")
    return (total, count, alpha_g) if n_offsets else (total, count)


def config_loss(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                teacher_logprobs_blk: jax.Array, loss_mask_bl: jax.Array, cfg: LossConfig, *,
                weights_bl: jax.Array | None = None, offsets_bl: jax.Array | None = None,
                vocab_bias_v: jax.Array | None = None):
    """`distill_loss` as a LossConfig sets it (acceptance by offset when streak weights track it)."""
    return distill_loss(hidden_bld, head_dv, teacher_ids_blk, teacher_logprobs_blk, loss_mask_bl,
                        kind=cfg.kind, temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                        beta=cfg.beta, lk_decay=cfg.lk_decay, chunk_axis=cfg.chunk_axis,
                        vocab_tile=cfg.vocab_tile, weights_bl=weights_bl, offsets_bl=offsets_bl,
                        n_offsets=cfg.tracked_offsets, vocab_bias_v=vocab_bias_v)


def _weighted_sums(logp, logq, mask_bl, weights_bl, offsets_bl, kind, beta, lk_decay,
                   n_offsets):
    """(sum of weight * divergence over the mask, acceptance sums by offset) of bucket
    log-probs [B, L, K+1]."""
    per_position = div.divergence(logp, logq, kind, beta, lk_decay)
    alpha = jnp.where(mask_bl, jnp.exp(div.log_acceptance(logp, logq)), 0.0)
    return (jnp.sum(jnp.where(mask_bl, weights_bl * per_position, 0.0)),
            jax.lax.stop_gradient(chunked_head.offset_sums(
                alpha.reshape(-1), offsets_bl.reshape(-1), n_offsets)))


def dense_distill_loss(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                       teacher_logprobs_blk: jax.Array, loss_mask_bl: jax.Array, *,
                       kind: str = "kl", temperature: float = 1.0, beta: float = 0.5,
                       lk_decay: float = 1.0, weights_bl: jax.Array | None = None,
                       vocab_bias_v: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`distill_loss` with the full [B, L, V] logits in memory: the yardstick that the tests and
    bench/loss_memory.py compare the chunked version against (values, gradients, memory)."""
    logits_blv = jnp.einsum("bld,dv->blv", hidden_bld, head_dv,
                            preferred_element_type=jnp.float32)
    if vocab_bias_v is not None:
        logits_blv = logits_blv + vocab_bias_v
    logp, logq = div.bucket_logprobs(logits_blv, teacher_ids_blk, teacher_logprobs_blk,
                                     temperature)
    weights_bl = jnp.ones(loss_mask_bl.shape) if weights_bl is None else weights_bl
    total, _ = _weighted_sums(logp, logq, loss_mask_bl, weights_bl,
                              jnp.full(loss_mask_bl.shape, -1), kind, beta, lk_decay, 0)
    return total, jnp.sum(loss_mask_bl).astype(jnp.float32)


def intersection_bias(student_tokenizer: str, teacher_tokenizer: str | None, vocab_size: int,
                      mask_token_id: int) -> jax.Array | None:
    """float32 [V]: 0 on the student ids `speculate --strategy tli` may draft, -inf elsewhere
    (None when the tokenizers are the same: nothing to restrict).

    TLI drafts from the student's distribution restricted to the ids whose bytes are also one
    teacher token (and never the mask token), renormalised: softmax(z + bias). Training with
    this bias (config field loss.intersection_vocab) fits exactly that distribution, so its
    acceptance alpha = sum min(p, q_I) is the one verification sees; without it the student also
    spends mass off the intersection that TLI throws away at drafting. The map is the one
    `preprocess` aligned the records with (data_pipeline.alignment.student_to_teacher, as
    speculate's VocabBridge), so every stored teacher id is inside it, and teacher mass outside it stays the
    tail bucket as before (the tail's student side becomes the intersection minus S).
    """
    if not teacher_tokenizer:
        return None
    student = alignment.Vocab.from_tokenizer(alignment.load_tokenizer(student_tokenizer))
    teacher = alignment.Vocab.from_tokenizer(alignment.load_tokenizer(teacher_tokenizer))
    allowed = alignment.student_to_teacher(teacher, student, vocab_size, 2 ** 62) >= 0
    allowed[mask_token_id] = False
    return jnp.where(jnp.asarray(allowed), 0.0, -jnp.inf).astype(jnp.float32)
