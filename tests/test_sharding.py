"""Mesh construction, logical-axis rules, and params placed on an 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests import helpers
from llada_jax import checkpoints
from llada_jax import cli
from llada_jax.model import params
from llada_jax import sharding

# What DEFAULT_RULES ask for: FSDP over the model dim, tensor parallel over heads / MLP / vocab.
EXPECTED_SPECS = {
    ("wte",): P("tensor", "fsdp"),
    ("ff_out",): P("fsdp", "tensor"),
    ("ln_f",): P(None),
    ("layers", "attn_norm"): P(None, None),
    ("layers", "ff_norm"): P(None, None),
    ("layers", "q_proj"): P(None, "fsdp", "tensor", None),
    ("layers", "k_proj"): P(None, "fsdp", "tensor", None),
    ("layers", "v_proj"): P(None, "fsdp", "tensor", None),
    ("layers", "attn_out"): P(None, "tensor", None, "fsdp"),
    ("layers", "ff_proj"): P(None, "fsdp", "tensor"),
    ("layers", "up_proj"): P(None, "fsdp", "tensor"),
    ("layers", "ff_out"): P(None, "tensor", "fsdp"),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = helpers.hf_config(n_heads=4, n_kv_heads=2)   # heads divisible by tensor=2
    state = {k: v.bfloat16() for k, v in helpers.random_state(cfg, seed=4).items()}
    return helpers.write_hf_dir(tmp_path_factory.mktemp("hf"), cfg, state)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"fsdp": 4, "tensor": 2})


def _flat_params(model):
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(str(k) for k in path): var[...] for path, var in flat}


def _assert_sharded_as_ruled(model, mesh):
    flat = _flat_params(model)
    assert set(flat) == set(EXPECTED_SPECS)
    for path, array in flat.items():
        spec = EXPECTED_SPECS[path]
        assert array.sharding.mesh.shape == mesh.shape, path
        # Compare normalised specs (trailing Nones are implied).
        assert array.sharding.spec + (None,) * (array.ndim - len(array.sharding.spec)) == \
            spec + (None,) * (array.ndim - len(spec)), (path, array.sharding.spec)
        expected_shard = tuple(d // (mesh.shape[a] if a else 1) for d, a in
                               zip(array.shape, tuple(spec) + (None,) * (array.ndim - len(spec))))
        assert all(s.data.shape == expected_shard for s in array.addressable_shards), path


def test_make_mesh_sizes_and_errors():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(sharding.make_mesh({"tensor": 2}).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert dict(sharding.make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.parse_mesh_spec("fsdp=4, tensor=2") == {"fsdp": 4, "tensor": 2}
    with pytest.raises(sharding.ShardingError, match="does not divide the 8 devices"):
        sharding.make_mesh({"fsdp": 3})
    with pytest.raises(sharding.ShardingError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 2})
    with pytest.raises(sharding.ShardingError, match="write axis=size"):
        sharding.parse_mesh_spec("fsdp:4")


def test_import_places_every_param_as_the_rules_ask(hf_dir, mesh):
    _, model = params.load_hf(hf_dir, mesh=mesh)
    _assert_sharded_as_ruled(model, mesh)
    _, plain = params.load_hf(hf_dir)
    for path, array in _flat_params(plain).items():
        np.testing.assert_array_equal(np.asarray(_flat_params(model)[path]), np.asarray(array))


def test_checkpoint_restores_onto_the_mesh(hf_dir, mesh, tmp_path):
    _, model = params.load_hf(hf_dir)
    checkpoints.save_params(tmp_path / "ckpt", model)
    cfg, restored = checkpoints.load_params(tmp_path / "ckpt", mesh=mesh)
    assert cfg.param_dtype == "bfloat16"
    _assert_sharded_as_ruled(restored, mesh)
    np.testing.assert_array_equal(np.asarray(restored.layers["q_proj"][...]),
                                  np.asarray(model.layers["q_proj"][...]))


def test_sharded_forward_matches_single_device(hf_dir, mesh):
    _, model = params.load_hf(hf_dir, compute_dtype="float32", dtype="float32")
    _, sharded = params.load_hf(hf_dir, mesh=mesh, compute_dtype="float32", dtype="float32")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (8, 6)), jnp.int32)
    graphdef, state = nnx.split(sharded)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    with jax.set_mesh(mesh), sharding.rules_context(sharding.DEFAULT_RULES):
        logits = forward(state, tokens)
        text = forward.lower(state, tokens).as_text()
    assert "sharding_constraint" in text
    assert logits.sharding.spec == P("fsdp", None, "tensor")   # ('batch', 'length', 'act_vocab')
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), atol=1e-5, rtol=0)


def test_indivisible_params_are_an_error_and_activations_stay_replicated(mesh):
    with pytest.raises(sharding.ShardingError, match="'q_heads' of size 3 is not divisible"):
        sharding.spec_for((2, 48, 3, 16), ("layers", "embed", "q_heads", "head_dim"), mesh,
                          sharding.DEFAULT_RULES)
    spec = sharding.spec_for((1, 5, 48), ("batch", "length", "act_embed"), mesh,
                             sharding.DEFAULT_RULES, strict=False)
    assert spec == P(None, None, None)
    custom = (("embed", ("fsdp", "tensor")), ("vocab", None))
    assert sharding.spec_for((64, 48), ("vocab", "embed"), mesh, custom) == P(None, ("fsdp", "tensor"))


def test_constrain_is_a_no_op_without_mesh():
    x = jnp.ones((2, 3, 4))
    assert sharding.constrain(x, ("batch", "length", "act_embed")) is x


def test_cli_import_with_mesh_writes_the_same_params(hf_dir, tmp_path):
    assert cli.main(["import-hf", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ckpt"),
                     "--mesh", "fsdp=4,tensor=2"]) == 0
    _, restored = checkpoints.load_params(tmp_path / "ckpt")
    _, direct = params.load_hf(hf_dir)
    for path, array in _flat_params(direct).items():
        assert _flat_params(restored)[path].dtype == array.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(_flat_params(restored)[path]), np.asarray(array))
