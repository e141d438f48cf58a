"""The tiny config's full train step (splash attention, chunked loss, AdamW, fsdp x tensor
shardings, donation) compiles for a v5e 2x2 TPU slice on this CPU machine (needs libtpu).

The TPU compiler's figures are checked against numbers computed here from the shapes: argument
bytes = this device's shard of params + AdamW moments + batch; the donated state is aliased; the
FLOPs are within a factor of 6 * matmul params * tokens (+ the loss's recomputed LM head).

The widths are TPU-tile aligned (head_dim 128, every shard's minor dimension a multiple of 128)
so that layout padding does not blur the byte counts.
"""

import copy
import math
import pathlib

import pytest

from llada_jax.train import config as train_config

from llada_jax.train import tpu_compile

pytestmark = pytest.mark.tpu_compile

TINY = pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"
VOCAB, TOP_K = 1024, 128
OVERRIDES = {"model.d_model": 256, "model.n_heads": 2, "model.n_kv_heads": 2,
             "model.mlp_hidden_size": 512, "model.attention_impl": "splash",
             "model.dtype": "bfloat16", "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}


@pytest.fixture(scope="module")
def config():
    return train_config.load_config(str(TINY), [f"--config.{k}={v}" for k, v in OVERRIDES.items()])


def param_counts(m) -> tuple[int, int]:
    """(sharded matrix params, replicated norm params) of the tiny LLaDA, from its shapes."""
    d, f, n_layers = m.d_model, m.mlp_hidden_size, m.n_layers
    per_layer = 4 * d * d + 3 * d * f                      # q, k, v, attn_out; ff, up, ff_out
    matrices = n_layers * per_layer + 2 * VOCAB * d         # + embedding, untied LM head
    norms = n_layers * 2 * d + d
    return matrices, norms


def test_train_step_compiles_for_v5e_with_the_expected_memory(config):
    report = tpu_compile.compile_train_step(config, "v5e-4", vocab_size=VOCAB,
                                            mask_token_id=VOCAB - 1, top_k=TOP_K)
    assert report.mesh == {"data": 1, "fsdp": 2, "tensor": 2}
    matrices, norms = param_counts(config.model)
    devices = 4
    # params + AdamW mu + nu in fp32; matrices split over fsdp x tensor, norms replicated.
    state_bytes = 3 * 4 * (matrices // devices + norms)
    rows = config.data.global_batch_size // 2             # batch over data x fsdp
    seq = config.data.seq_len
    batch_bytes = rows * seq * (3 * 4 + 2 * 1 + TOP_K * (4 + 4))
    assert math.isclose(report.alias_bytes, state_bytes, rel_tol=0.01)       # donation worked
    assert math.isclose(report.argument_bytes, state_bytes + batch_bytes, rel_tol=0.01)
    assert report.output_bytes >= report.alias_bytes
    assert 0 < report.temp_bytes < 16 * (state_bytes + batch_bytes)
    assert report.fits and report.total_bytes < 0.01 * report.hbm_bytes


@pytest.mark.parametrize("chunk_axis", ["sequence", "vocab"])
def test_train_step_flops_match_the_parameter_count(config, chunk_axis):
    config = copy.deepcopy(config)
    config.loss.chunk_axis = chunk_axis
    flops = tpu_compile.flops_per_step(config, "v5e-4", vocab_size=VOCAB,
                                       mask_token_id=VOCAB - 1, top_k=TOP_K)
    m = config.model
    tokens = config.data.global_batch_size * config.data.seq_len
    layer_params = m.n_layers * (4 * m.d_model ** 2 + 3 * m.d_model * m.mlp_hidden_size)
    head = m.d_model * VOCAB
    # fwd + bwd (6 per param per token); the vocabulary-tiled loss also recomputes the head's
    # forward, the sequence-chunked one (custom VJP) does not.
    recompute = 2 * head if chunk_axis == "vocab" else 0
    estimate = (6 * (layer_params + head) + recompute) * tokens / 4
    assert 0.8 < flops / estimate < 1.25, (flops, estimate)


@pytest.mark.parametrize("variant,target", [("v5e_64", "v5e-64"), ("v5p_32", "v5p-32"),
                                            ("v4_32", "v4-32"), ("v6e_16", "v6e-16")])
def test_llada_8b_variants_match_their_slice(variant, target):
    """The mesh covers exactly the slice's chips; the batch is a whole number per chip."""
    config = train_config.load_config(f"{TINY.parent / 'llada_8b.py'}:{variant}")
    chips = len(tpu_compile.topology_devices(target))
    assert config.mesh.data * config.mesh.fsdp * config.mesh.tensor == chips
    assert config.data.global_batch_size % chips == 0 and config.data.seq_len == 4096
    assert (config.model.attention_impl, config.model.dtype) == ("splash", "bfloat16")


def test_cached_decode_step_updates_the_cache_in_place():
    """The teacher's KV-cached step (decode/cached.py) on v5e 2x2, KV heads over tensor, rows
    over fsdp: the donated cache is aliased to the output and the temporaries do not grow with
    it (the new keys/values are written once, not copied per layer)."""
    from llada_jax.model.config import ModelConfig
    cfg = ModelConfig(d_model=256, n_heads=4, n_kv_heads=2, n_layers=3, mlp_hidden_size=512,
                      vocab_size=VOCAB, mask_token_id=None, causal=True, model_type="llama",
                      param_dtype="bfloat16", dtype="bfloat16")
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    reports = [tpu_compile.compile_decode_step(cfg, "v5e-4", mesh, batch_size=8, max_length=s)
               for s in (512, 1024)]
    for report, slots in zip(reports, (512, 1024)):
        # k and v [B, layers, S, K, hd] bf16, this device's quarter (rows / 2, heads / 2).
        cache = 2 * 8 * cfg.n_layers * slots * cfg.n_kv_heads * cfg.head_dim * 2 // 4
        assert report.alias_bytes >= cache and report.fits
    grown = reports[1].temp_bytes - reports[0].temp_bytes
    assert grown < 0.1 * (reports[1].alias_bytes - reports[0].alias_bytes), grown


def test_decode_step_out_of_hbm_is_reported_as_such():
    """A 70B-shaped teacher's cache at 400 rows x 4096 slots does not fit v6e-16's 32 GiB per
    chip: the compiler refuses it (its "HLO temporaries exceed available HBM" message), which
    the decode-plan search reads as "does not fit" (tpu_compile.OutOfHbm), not as a crash."""
    from llada_jax.model.config import ModelConfig
    from llada_jax.model.llama_config import LLAMA_3_3_70B

    cfg = ModelConfig.from_hf_config(LLAMA_3_3_70B, param_dtype="bfloat16", dtype="bfloat16")
    with pytest.raises(tpu_compile.OutOfHbm, match=r"needs \S+ of 31.25G HBM"):
        tpu_compile.compile_decode_step(cfg, "v6e-16",
                                        {"data": 1, "fsdp": 4, "tensor": 4}, batch_size=400,
                                        max_length=4096)
