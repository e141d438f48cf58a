"""Train step: accumulation, non-finite skipping, sharded == single device, optimizer details."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax.train import config as train_config

from llada_jax.train import optim

from llada_jax import sharding

from llada_jax.train import train_step
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import LLaDAModel

TINY = pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"
MODEL = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                    vocab_size=96, mask_token_id=95, dtype="float32")


def synthetic_batch(b=8, seq=24, k=6, seed=0):
    """Two packed segments per row plus padding; teacher top-k from a random distribution."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, seq), np.int32)
    seg[:, :10], seg[:, 10:20] = 1, 2
    pos = np.where(seg == 1, np.arange(seq), np.arange(seq) - 10).astype(np.int32) * (seg > 0)
    probs = rng.dirichlet(np.ones(MODEL.vocab_size), (b, seq))
    ids = np.argsort(-probs, -1)[..., :k].astype(np.int32)
    return dict(
        tokens=rng.integers(0, 90, (b, seq)).astype(np.int32) * (seg > 0), positions=pos,
        segment_ids=seg, prompt_mask=(pos < 3) & (seg > 0), target_mask=seg > 0,
        teacher_ids=ids,
        teacher_logprobs=np.log(np.take_along_axis(probs, ids, -1)).astype(np.float32))


def setup(**overrides):
    config = train_config.load_config(str(TINY), [f"--config.{k}={v}" for k, v in overrides.items()])
    optimizer = optim.make_optimizer(config.optim, total_steps=20)
    graphdef, params = nnx.split(LLaDAModel(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
    state = train_step.init_train_state(params, optimizer)
    step = jax.jit(train_step.make_train_step(graphdef, optimizer, config, MODEL.mask_token_id))
    return state, step


def run_steps(state, step, n=3):
    metrics = []
    for i in range(n):
        state, m = step(state, synthetic_batch(seed=i), jax.random.key(7))
        metrics.append(jax.device_get(m))
    return state, metrics


def max_param_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_gradient_accumulation_matches_full_batch():
    s1, m1 = run_steps(*setup())
    s2, m2 = run_steps(*setup(**{"optim.grad_accum_steps": 4}))
    assert [m["loss_count"] for m in m1] == [m["loss_count"] for m in m2]
    np.testing.assert_allclose([m["loss_sum"] for m in m1], [m["loss_sum"] for m in m2], rtol=1e-5)
    assert max_param_diff(s1.params, s2.params) < 1e-6
    assert max_param_diff(s1.params, setup()[0].params) > 1e-4  # training moved the params


def test_non_finite_update_is_skipped_and_counted():
    state, step = setup()
    batch = synthetic_batch()
    wte = state.params["wte"][...]
    poisoned = state.replace(params=jax.tree.map(lambda x: x, state.params))
    poisoned.params["wte"][...] = wte.at[int(batch["tokens"][0, 4])].set(jnp.inf)
    before = jax.tree.map(np.asarray, poisoned.params)
    after, m = step(poisoned, batch, jax.random.key(0))
    assert not np.isfinite(m["loss_sum"]) or not np.isfinite(m["grad_norm"])
    assert int(m["skipped"]) == 1 and int(after.skipped_steps) == 1 and int(after.step) == 1
    np.testing.assert_array_equal(np.asarray(after.params["ln_f"][...]), before["ln_f"][...])
    np.testing.assert_array_equal(np.asarray(after.params["layers"]["q_proj"][...]),
                                  before["layers"]["q_proj"][...])
    for _ in range(2):  # the clean state still trains (lr is 0 at step 0: warmup from 0)
        state, m = step(state, batch, jax.random.key(0))
    assert int(m["skipped"]) == 0 and int(state.skipped_steps) == 0
    assert max_param_diff(state.params, setup()[0].params) > 0.0


def test_sharded_8_devices_matches_single_device():
    assert jax.device_count() == 8
    s1, m1 = run_steps(*setup())
    state, step_fn = setup()
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    shard = train_step.state_shardings(jax.eval_shape(lambda: state), mesh, sharding.DEFAULT_RULES)
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    config = train_config.load_config(str(TINY))
    optimizer = optim.make_optimizer(config.optim, total_steps=20)
    graphdef, _ = nnx.split(LLaDAModel(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
    step = jax.jit(train_step.make_train_step(graphdef, optimizer, config, MODEL.mask_token_id),
                   in_shardings=(shard, batch_sh, rep), out_shardings=(shard, rep), donate_argnums=0)
    state = jax.device_put(state, shard)
    with jax.set_mesh(mesh), sharding.rules_context(sharding.DEFAULT_RULES):
        s8, m8 = run_steps(state, step)
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
