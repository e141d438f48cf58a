"""Test-wide setup: 8 fake CPU devices for sharding tests, strict fp32 matmuls."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory):
    """(HF LLaMA dir, its tokenizer): a random LlamaForCausalLM with llama3 RoPE scaling."""
    import llama_fixtures

    return llama_fixtures.write_llama_teacher(tmp_path_factory.mktemp("llama_teacher"))
