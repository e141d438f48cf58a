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
from llada_jax.train import loss as loss_lib
from llada_jax.train import masking
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


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      skipped_steps=jnp.zeros((), jnp.int32))


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
                 loss_cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(sum of per-position divergences, number of positions) for one (micro)batch."""
    model = nnx.merge(graphdef, params)
    hidden_bld = model(noisy_tokens_bl, positions_bl=batch["positions"],
                       segment_ids_bl=batch["segment_ids"], return_hidden=True)
    return loss_lib.distill_loss(
        hidden_bld, model.lm_head_weight(), batch["teacher_ids"], batch["teacher_logprobs"],
        loss_mask_bl, kind=loss_cfg.kind, temperature=loss_cfg.temperature, beta=loss_cfg.beta,
        chunk_axis=loss_cfg.chunk_axis, chunk_size=loss_cfg.chunk_size,
        vocab_tile=loss_cfg.vocab_tile)


def _split_micro(x, n: int):
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mask_token_id: int
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """Returns `step(state, batch, rng) -> (state, metrics)`; metrics are (sum, count)-friendly.

    The divergence is normalised once, by the number of target positions of the whole global
    batch (all microbatches, all hosts), so gradient accumulation changes nothing but memory.
    """
    accum = int(config.optim.grad_accum_steps)

    def sums_and_grads(params, batch, noisy, loss_mask):
        grad_fn = jax.value_and_grad(
            lambda p, b, x, m: distill_sums(graphdef, p, b, x, m, config.loss), has_aux=True)
        (loss_sum, count), grads = grad_fn(params, batch, noisy, loss_mask)
        return loss_sum, count, grads

    def step(state: TrainState, batch: Batch, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        noisy, loss_mask = masking.diffusion_mask(
            step_rng, batch, mask_token_id=mask_token_id, mode=config.loss.mask_mode,
            eps=config.loss.mask_eps)
        if accum == 1:
            loss_sum, count, grad_sums = sums_and_grads(state.params, batch, noisy, loss_mask)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, accum), (batch, noisy, loss_mask))

            def body(carry, xs):
                s, c, g = sums_and_grads(state.params, *xs)
                return jax.tree.map(jnp.add, carry, (s, c, g)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, count, grad_sums), _ = jax.lax.scan(body, zeros, micro)
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
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
        metrics = {
            "loss_sum": loss_sum, "loss_count": count, "grad_norm": grad_norm,
            "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
            "skipped": (~finite).astype(jnp.int32),
        }
        return new_state, metrics

    return step


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

    def random_state(self, seed: int) -> TrainState:
        """A freshly initialised state (random params), made sharded in place on the mesh."""
        def init():
            model = LLaDAModel(self.model_cfg, rngs=nnx.Rngs(seed))
            return init_train_state(nnx.state(model, nnx.Param), self.optimizer)

        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.state_sharding)()


def jit_train_step(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                   mesh: jax.sharding.Mesh, rules: sharding.Rules, total_steps: int) -> JittedStep:
    """Builds the state abstractly (no allocation), its shardings, and the jitted step."""
    abstract_model = nnx.eval_shape(lambda: LLaDAModel(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    optimizer = optim.make_optimizer(config.optim, total_steps)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params)
    state_sharding = state_shardings(abstract_state, mesh, rules)
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(rules))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(make_train_step(graphdef, optimizer, config, model_cfg.mask_token_id),
                   in_shardings=(state_sharding, batch_sharding, replicated),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
    return JittedStep(step, graphdef, optimizer, abstract_state, state_sharding, batch_sharding,
                      replicated, model_cfg, mesh)
