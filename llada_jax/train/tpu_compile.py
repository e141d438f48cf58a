"""Ahead-of-time compilation of the train step for a Cloud TPU topology, on any machine.

With the `libtpu` wheel installed, JAX describes a TPU slice that is not there
(`jax.experimental.topologies`) and compiles for it; the executable's memory and cost analyses
are the TPU compiler's own figures (DESIGN.md "TPU without a TPU"). The inputs are abstract
(ShapeDtypeStructs carrying their shardings), so nothing is allocated, at any model size.

    report = compile_train_step(config, "v5e-4", vocab_size=512, mask_token_id=511)
    report.total_bytes, report.hbm_bytes, report.flops_per_device

Figures are per device (one chip; v4 and v5p chips are one megacore device each).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.experimental import topologies

from data_pipeline import batch as batch_lib
from llada_jax import sharding

from llada_jax.train import config as train_config

from llada_jax.train import train_step
from llada_jax.model import params
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import CACHE_AXES, init_cache
from llada_jax.decode import cached as decode

GIB = 1024 ** 3
# Keeps libtpu from looking for a TPU VM's metadata server and worker list (it only describes
# the topology here), and lets several processes (parallel tests, a benchmark) load it at once
# (it otherwise holds /tmp/libtpu_lockfile). setdefault: a real TPU VM's own values win.
LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
              "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A Cloud TPU slice as libtpu names it; HBM per device."""

    topology: str            # e.g. "v5e:8x8" (chips along each torus axis)
    hbm_gib: float
    chip_config: str = "default"


# Cloud names (TensorCores for v4/v5p, chips for v5e/v6e) -> the slice. v4 needs "megacore"
# to give one device per chip, as JAX does on a real v4; v5p is megacore by default.
TARGETS: dict[str, TpuTarget] = {
    "v5e-4": TpuTarget("v5e:2x2", 16),
    "v5e-64": TpuTarget("v5e:8x8", 16),
    "v5p-32": TpuTarget("v5p:2x2x4", 95),
    "v4-32": TpuTarget("v4:2x2x4", 32, chip_config="megacore"),
    "v6e-16": TpuTarget("v6e:4x4", 32),
}


def topology_devices(target: str) -> list[jax.Device]:
    """The (not attached) devices of a TARGETS slice, for a Mesh to compile against."""
    if target not in TARGETS:
        raise ValueError(f"unknown TPU target {target!r}; known: {sorted(TARGETS)}")
    for key, value in LIBTPU_ENV.items():
        os.environ.setdefault(key, value)
    spec = TARGETS[target]
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=spec.topology, chip_config_name=spec.chip_config,
            chips_per_host_bounds=(2, 2, 1), num_slices=1)
    except Exception as err:  # most often: libtpu missing or not the version jax pins
        raise RuntimeError(f"cannot describe TPU topology {spec.topology!r}: {err}. If libtpu is "
                           f"missing, install the wheel jax pins: pip install 'jax[tpu]=="
                           f"{jax.__version__}'") from err
    return list(topology.devices)


# The TPU compiler's two out-of-HBM messages: "Used 40.1G of 31.25G hbm. Exceeded hbm capacity
# by ..." and "the total memory required for HLO temporaries (39.97G) exceeds available HBM
# (31.25G)".
_OUT_OF_HBM = (re.compile(r"Used (\S+) of (\S+) hbm"),
               re.compile(r"required for HLO temporaries \(([^)]+)\) exceeds available HBM \(([^)]+)\)"))


class OutOfHbm(RuntimeError):
    """The TPU compiler found no schedule within HBM (some steps fail this way, others compile
    and report a total above HBM)."""


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-device figures of one compiled train step (bytes, FLOPs)."""

    target: str
    mesh: dict[str, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int          # outputs that reuse donated argument buffers
    temp_bytes: int
    code_bytes: int
    flops_per_device: float   # as the cost analysis counts: a scanned layer stack as ONE layer
    hbm_bytes: int

    @property
    def total_bytes(self) -> int:
        """Peak HBM the executable needs: arguments + fresh outputs + temporaries + code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes


def lower_train_step(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                     devices: list[jax.Device], *, top_k: int = 64) -> tuple[jax.stages.Lowered, Any]:
    """(lowered step, mesh): the Trainer's jit signature over abstract state and batch."""
    rules = config.mesh.rules
    mesh = sharding.make_mesh({k: config.mesh[k] for k in sharding.MESH_AXES}, devices)
    jitted = train_step.jit_train_step(config, model_cfg, mesh, rules, total_steps=1000)
    batch = batch_lib.abstract((config.data.global_batch_size, config.data.seq_len, top_k))
    rng = jax.eval_shape(lambda: jax.random.key(0))
    # A training run's own matmul precision: a global "highest" (the tests set it for CPU
    # numerics) makes Mosaic reject the splash kernel's bf16 matmuls.
    with jax.set_mesh(mesh), sharding.rules_context(rules), jax.default_matmul_precision("default"):
        lowered = jitted.step.lower(
            sharding.with_shardings(jitted.abstract_state, jitted.state_sharding),
            sharding.with_shardings(batch, {k: jitted.batch_sharding for k in batch}),
            sharding.with_shardings(rng, jitted.replicated))
    return lowered, mesh


def compile_train_step(config: ml_collections.ConfigDict, target: str, *, vocab_size: int,
                       mask_token_id: int, top_k: int = 64) -> CompileReport:
    """Compiles `config`'s train step for TARGETS[target]; the compiler's per-device figures."""
    devices = topology_devices(target)
    model_cfg = train_config.random_init_model_config(config, vocab_size, mask_token_id)
    lowered, mesh = lower_train_step(config, model_cfg, devices, top_k=top_k)
    return _compile_report(lowered, target, mesh)


def compile_decode_step(model_cfg: ModelConfig, target: str, mesh_sizes: dict[str, int], *,
                        batch_size: int, max_length: int, tokens_per_step: int = 1,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> CompileReport:
    """Compiles one KV-cached teacher step (decode/cached.py: `tokens_per_step` tokens per row
    appended to a donated [batch_size, max_length] cache) for TARGETS[target]."""
    mesh = sharding.make_mesh(mesh_sizes, topology_devices(target))
    graphdef, state = nnx.split(params.abstract_model(model_cfg))
    nnx.replace_by_pure_dict(state, sharding.with_shardings(nnx.to_pure_dict(state), nnx.to_pure_dict(
            sharding.param_shardings(state, mesh, rules))))
    tokens = jax.ShapeDtypeStruct((batch_size, tokens_per_step), jnp.int32)
    with jax.set_mesh(mesh), sharding.rules_context(rules), jax.default_matmul_precision("default"):
        cache = jax.eval_shape(lambda: init_cache(model_cfg, batch_size, max_length))
        cache_spec = sharding.spec_for(cache.k.shape, CACHE_AXES, mesh, rules, strict=False)
        row_spec = sharding.spec_for((batch_size,), ("batch",), mesh, rules, strict=False)
        cache = sharding.with_shardings(cache, type(cache)(*(jax.NamedSharding(mesh, s) for s in
                                                    (cache_spec, cache_spec, row_spec, row_spec))))
        lowered = decode.extend_step.lower(graphdef, state, cache, tokens, all_logits=True)
    return _compile_report(lowered, target, mesh)


def _compile_report(lowered: jax.stages.Lowered, target: str, mesh) -> CompileReport:
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        used = next((m for pattern in _OUT_OF_HBM if (m := pattern.search(str(err)))), None)
        if used is None:
            raise
        raise OutOfHbm(f"needs {used[1]} of {used[2]} HBM") from err
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return CompileReport(
        target=target, mesh=dict(mesh.shape), argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
        flops_per_device=float(cost["flops"]), hbm_bytes=int(TARGETS[target].hbm_gib * GIB))


def flops_per_step(config: ml_collections.ConfigDict, target: str, *, vocab_size: int,
                   mask_token_id: int, top_k: int = 64) -> float:
    """Per-device FLOPs of one train step with all `config.model.n_layers` layers.

    XLA's cost analysis counts the body of the layer scan once, whatever the trip count, so the
    step is compiled with 1 and 2 unrolled layers and extrapolated (the layers are identical).
    Pallas kernels (splash) carry no cost estimate: their FLOPs are not included.
    """
    flops = []
    for n_layers in (1, 2):
        small = config.copy_and_resolve_references()
        small.model.update(n_layers=n_layers, scan_layers=False)
        flops.append(compile_train_step(small, target, vocab_size=vocab_size,
                                        mask_token_id=mask_token_id, top_k=top_k).flops_per_device)
    return flops[0] + (config.model.n_layers - 1) * (flops[1] - flops[0])
