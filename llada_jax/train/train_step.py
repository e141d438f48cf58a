"""The jitted train step: diffusion masking -> forward -> chunked KL -> AdamW.

State is a plain pytree (`TrainState`) so that it shards, donates and checkpoints like any other;
the NNX module is rebuilt from its graphdef inside the step (`nnx.merge`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from data_pipeline.batch import Batch
from llada_jax.distill import chunked_head
from llada_jax.distill import loss as loss_lib
from llada_jax.distill import masking
from llada_jax.train import optim
from llada_jax import sharding
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import LLaDAModel



@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32 [] optimizer steps taken (skipped ones included)
    params: Any                # nnx.State of the model's Params (fp32 by default)
    opt_state: Any
    skipped_steps: jax.Array   # int32 [] steps whose update was not finite and was dropped
    # float32 [gamma] smoothed acceptance of the student by drafted offset (streak position
    # weights; -1 = not measured yet); None unless loss.position_weights is streak.
    acceptance: Any = None


def init_train_state(params, optimizer: optax.GradientTransformation, n_offsets: int = 0
                     ) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      skipped_steps=jnp.zeros((), jnp.int32),
                      acceptance=jnp.full((n_offsets,), -1.0, jnp.float32) if n_offsets else None)


def training_mask(rng, batch: Batch, loss_cfg: loss_lib.LossConfig, mask_token_id: int):
    """(noisy tokens, loss mask, offsets or None, segment ids) for this step's masking."""
    if loss_cfg.mask_mode == "draft_blocks":
        blocks = masking.draft_blocks(rng, batch, mask_token_id=mask_token_id,
                                      gamma=int(loss_cfg.draft_gamma),
                                      gamma_max=int(loss_cfg.draft_gamma_max),
                                      trailing=int(loss_cfg.draft_trailing),
                                      score_prefix=bool(loss_cfg.draft_score_prefix),
                                      score_trailing=bool(loss_cfg.draft_score_trailing),
                                      original_fraction=float(loss_cfg.draft_original_fraction),
                                      eps=float(loss_cfg.mask_eps))
        return blocks.noisy, blocks.loss_mask, blocks.offset, blocks.segment_ids
    noisy, loss_mask = masking.diffusion_mask(rng, batch, mask_token_id=mask_token_id,
                                              mode=loss_cfg.mask_mode, eps=loss_cfg.mask_eps)
    return noisy, loss_mask, None, batch["segment_ids"]


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules) -> object:
    """Same tree as the state: params and optimizer moments sharded by their logical names
    (optax copies the Param metadata into mu/nu), scalars (step, counts) replicated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding") or (None,) * len(x.shape)
            spec = sharding.spec_for(x.shape, names, mesh, rules, what="train state")
            return x.replace(jax.sharding.NamedSharding(mesh, spec))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def distill_sums(graphdef, params, batch: Batch, noisy_tokens_bl, loss_mask_bl,
                 loss_cfg: loss_lib.LossConfig, segment_ids_bl=None, weights_bl=None,
                 offsets_bl=None, vocab_bias_v=None):
    """(sum of per-position weighted divergences, number of positions[, acceptance sums by
    offset when the config tracks them]) for one (micro)batch."""
    model = nnx.merge(graphdef, params)
    hidden_bld = model(noisy_tokens_bl, positions_bl=batch["positions"],
                       segment_ids_bl=batch["segment_ids"] if segment_ids_bl is None
                       else segment_ids_bl, return_hidden=True)
    return loss_lib.config_loss(hidden_bld, model.lm_head_weight(), batch["teacher_ids"],
                                batch["teacher_logprobs"], loss_mask_bl, loss_cfg,
                                weights_bl=weights_bl, offsets_bl=offsets_bl,
                                vocab_bias_v=vocab_bias_v)


def _split_micro(x, n: int):
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mask_token_id: int, vocab_bias=None
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """Returns `step(state, batch, rng) -> (state, metrics)`; metrics are (sum, count)-friendly.

    The divergence is normalised once, by the number of target positions of the whole global
    batch (all microbatches, all hosts), so gradient accumulation changes nothing but memory.
    vocab_bias [V]: added to the student's logits in the loss (`loss.intersection_bias`).
    With streak position weights the state's per-offset acceptance (an EMA, decay
    loss.streak_ema, of this batch's mean alpha at each offset) sets the next step's weights.
    """
    accum = int(config.optim.grad_accum_steps)
    loss_cfg = loss_lib.LossConfig.from_config(config.loss)
    n_offsets = loss_cfg.tracked_offsets

    def sums_and_grads(params, batch, noisy, loss_mask, segs, weights, offsets):
        def sums(p):
            out = distill_sums(graphdef, p, batch, noisy, loss_mask, loss_cfg, segs, weights,
                               offsets, vocab_bias)
            return out[0], (out[1], out[2] if n_offsets else jnp.zeros((0,), jnp.float32))
        (loss_sum, (count, alpha_g)), grads = jax.value_and_grad(sums, has_aux=True)(params)
        return loss_sum, count, alpha_g, grads

    def step(state: TrainState, batch: Batch, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        noisy, loss_mask, offsets, segs = training_mask(step_rng, batch, loss_cfg, mask_token_id)
        offsets = jnp.full(loss_mask.shape, -1, jnp.int32) if offsets is None else offsets
        w_g = loss_lib.offset_weights(loss_cfg.position_weights, state.acceptance,
                                      loss_cfg.geometric_ratio, loss_cfg.block_offsets)
        weights = jnp.where(offsets >= 0, w_g[jnp.maximum(offsets, 0)], 1.0)
        xs = (batch, noisy, loss_mask, segs, weights, offsets)
        if accum == 1:
            loss_sum, count, alpha_g, grad_sums = sums_and_grads(state.params, *xs)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, accum), xs)

            def body(carry, xs):
                return jax.tree.map(jnp.add, carry, sums_and_grads(state.params, *xs)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jnp.zeros((n_offsets,), jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, count, alpha_g, grad_sums), _ = jax.lax.scan(body, zeros, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sums)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
            acceptance=None if not n_offsets else _smoothed_acceptance(
                state.acceptance, alpha_g, offsets, loss_mask, float(loss_cfg.streak_ema)))
        metrics = {
            "loss_sum": loss_sum, "loss_count": count, "grad_norm": grad_norm,
            "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
            "skipped": (~finite).astype(jnp.int32),
        }
        return new_state, metrics

    return step


def _smoothed_acceptance(ema_g, alpha_sums_g, offsets_bl, loss_mask_bl, decay: float):
    """EMA of this batch's mean acceptance per offset (offsets this batch did not reach keep
    their value; the first measurement replaces the -1 start)."""
    counts_g = chunked_head.offset_sums(loss_mask_bl.reshape(-1).astype(jnp.float32),
                                        offsets_bl.reshape(-1), ema_g.shape[0])
    mean_g = alpha_sums_g / jnp.maximum(counts_g, 1.0)
    new = jnp.where(ema_g < 0, mean_g, decay * ema_g + (1.0 - decay) * mean_g)
    return jnp.where(counts_g > 0, new, ema_g)


@dataclasses.dataclass(frozen=True)
class JittedStep:
    """The train step's jit signature and what it was built from (shared by the trainer and the
    TPU compile checks, so both compile the very same program)."""
    step: Callable                 # jit(step, in/out shardings, donated state)
    graphdef: Any
    optimizer: optax.GradientTransformation
    abstract_state: TrainState     # ShapeDtypeStructs
    state_sharding: Any
    batch_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    n_offsets: int = 0             # the state's tracked acceptance offsets (streak weights)

    def random_state(self, seed: int) -> TrainState:
        """A freshly initialised state (random params), made sharded in place on the mesh."""
        def init():
            model = LLaDAModel(self.model_cfg, rngs=nnx.Rngs(seed))
            return init_train_state(nnx.state(model, nnx.Param), self.optimizer,
                                    self.n_offsets)

        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.state_sharding)()


def jit_train_step(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                   mesh: jax.sharding.Mesh, rules: sharding.Rules, total_steps: int,
                   vocab_bias=None) -> JittedStep:
    """Builds the state abstractly (no allocation), its shardings, and the jitted step."""
    abstract_model = nnx.eval_shape(lambda: LLaDAModel(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    optimizer = optim.make_optimizer(config.optim, total_steps)
    n_offsets = loss_lib.LossConfig.from_config(config.loss).tracked_offsets
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer, n_offsets),
                                    abstract_params)
    state_sharding = state_shardings(abstract_state, mesh, rules)
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(rules))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(make_train_step(graphdef, optimizer, config, model_cfg.mask_token_id,
                                   vocab_bias),
                   in_shardings=(state_sharding, batch_sharding, replicated),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
    return JittedStep(step, graphdef, optimizer, abstract_state, state_sharding, batch_sharding,
                      replicated, model_cfg, mesh, n_offsets)
