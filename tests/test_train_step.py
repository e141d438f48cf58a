"""Train step: accumulation, non-finite skipping, sharded == single device, optimizer details."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import batch as batch_lib
from llada_jax.train import config as train_config

from llada_jax.train import optim

from llada_jax import sharding

from llada_jax.train import train_step
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import LLaDAModel

TINY = pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"
MODEL = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                    vocab_size=96, mask_token_id=95, dtype="float32")


def synthetic_batch(seed=0):
    """Two packed segments per row plus padding; teacher top-k with a tail."""
    return batch_lib.synthetic(np.random.default_rng(seed), (8, 24, 6),
                               vocab_size=MODEL.vocab_size, segments=[(3, 7), (3, 7)],
                               exclude_id=MODEL.mask_token_id)


def setup(mesh_axes=None, **overrides):
    """(initial state, jitted step): the program `train` compiles (`jit_train_step`), on one
    device or on a mesh of the 8 test devices."""
    config = train_config.load_config(str(TINY), [f"--config.{k}={v}" for k, v in overrides.items()])
    mesh = (sharding.make_mesh(mesh_axes) if mesh_axes else
            sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    jitted = train_step.jit_train_step(config, MODEL, mesh, sharding.DEFAULT_RULES, total_steps=20)
    return jitted.random_state(0), jitted


def run_steps(state, jitted, n=3):
    metrics = []
    with jax.set_mesh(jitted.mesh), sharding.rules_context(sharding.DEFAULT_RULES):
        for i in range(n):
            state, m = jitted.step(state, synthetic_batch(seed=i), jax.random.key(7))
            metrics.append(jax.device_get(m))
    return state, metrics


def max_param_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_gradient_accumulation_matches_full_batch():
    s1, m1 = run_steps(*setup())
    s2, m2 = run_steps(*setup(**{"optim.grad_accum_steps": 4}))
    assert [m["loss_count"] for m in m1] == [m["loss_count"] for m in m2]
    np.testing.assert_allclose([m["loss_sum"] for m in m1], [m["loss_sum"] for m in m2], rtol=1e-5)
    assert max_param_diff(s1.params, s2.params) < 1e-6
    assert max_param_diff(s1.params, setup()[0].params) > 1e-4  # training moved the params


def test_non_finite_update_is_skipped_and_counted():
    state, jitted = setup()
    batch = synthetic_batch()
    poisoned = jax.tree.map(jnp.copy, state)  # the step donates its input state
    # a prompt token: never masked, so its embedding row is always read
    poisoned.params["wte"][...] = poisoned.params["wte"][...].at[int(batch["tokens"][0, 1])].set(
        jnp.inf)
    before = jax.tree.map(np.asarray, poisoned.params)
    after, m = jitted.step(poisoned, batch, jax.random.key(0))
    assert not np.isfinite(m["loss_sum"]) or not np.isfinite(m["grad_norm"])
    assert int(m["skipped"]) == 1 and int(after.skipped_steps) == 1 and int(after.step) == 1
    np.testing.assert_array_equal(np.asarray(after.params["ln_f"][...]), before["ln_f"][...])
    np.testing.assert_array_equal(np.asarray(after.params["layers"]["q_proj"][...]),
                                  before["layers"]["q_proj"][...])
    for _ in range(2):  # the clean state still trains (lr is 0 at step 0: warmup from 0)
        state, m = jitted.step(state, batch, jax.random.key(0))
    assert int(m["skipped"]) == 0 and int(state.skipped_steps) == 0
    assert max_param_diff(state.params, setup()[0].params) > 0.0


def test_sharded_8_devices_matches_single_device():
    assert jax.device_count() == 8
    s1, m1 = run_steps(*setup())
    s8, m8 = run_steps(*setup({"fsdp": 4, "tensor": 2}))
    q_proj = s8.params["layers"]["q_proj"][...]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_allclose([m["loss_sum"] for m in m1], [m["loss_sum"] for m in m8], rtol=1e-5)
    assert max_param_diff(s1.params, s8.params) < 1e-5


def test_weight_decay_skips_norms_and_schedule_shape():
    config = train_config.load_config(str(TINY), ["--config.optim.lr=1e-2", "--config.optim.warmup_steps=4"])
    params = nnx.state(LLaDAModel(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(optim.decay_mask(params))
    assert mask["layers"]["attn_norm"] is False and mask["ln_f"] is False
    assert mask["layers"]["q_proj"] is True and mask["wte"] is True and mask["ff_out"] is True
    schedule = optim.learning_rate_schedule(config.optim, total_steps=10)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4, 7, 10)],
                               [0.0, 5e-3, 1e-2, 5e-3, 0.0], atol=1e-9)
    # Zero gradients: norms stay put, matrices shrink by lr * wd (decoupled decay).
    optimizer = optim.make_optimizer(config.optim, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt_state = optimizer.init(params)
    for _ in range(3):
        updates, opt_state = optimizer.update(zeros, opt_state, params)
    new = nnx.to_pure_dict(jax.tree.map(lambda p, u: p + u, params, updates))
    old = nnx.to_pure_dict(params)
    np.testing.assert_array_equal(new["ln_f"], old["ln_f"])
    lr2 = float(schedule(2))
    np.testing.assert_allclose(new["wte"], old["wte"] * (1 - lr2 * 0.1), rtol=1e-6)
