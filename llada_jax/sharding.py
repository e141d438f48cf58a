"""Logical axis names -> a device Mesh ('data', 'fsdp', 'tensor').

Every model parameter carries logical axis names in its nnx metadata (`out_sharding`, e.g.
('layers', 'embed', 'q_heads', 'head_dim')); main activations are pinned with `constrain(x, names)`.
Rules (name -> mesh axis, a tuple of mesh axes, or None = replicated) turn names into
PartitionSpecs. Usage (training):

    mesh = make_mesh({"fsdp": 4, "tensor": 2})           # data = the remaining devices
    shardings = param_shardings(nnx.state(abstract_model, nnx.Param), mesh, DEFAULT_RULES)
    with jax.set_mesh(mesh), rules_context(DEFAULT_RULES):
        ... jax.jit(step, in_shardings=..., out_shardings=...) ...

`constrain` is a no-op when no mesh is set, so the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llada_jax.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Params: FSDP over the model dimension, tensor parallelism over heads / MLP / vocab.
# Activations: batch over data x fsdp, heads / MLP / vocab over tensor.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def parse_mesh_spec(text: str) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2} (axes not named keep their defaults)."""
    sizes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ShardingError(f"bad mesh item {item!r}: write axis=size, e.g. fsdp=4,tensor=2")
        sizes[name.strip()] = int(value)
    return sizes


def mesh_sizes(axis_sizes: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """{axis: size} for MESH_AXES over `num_devices`; one given size may be -1 (the rest)."""
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    unknown = set(axis_sizes or {}) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes.update(axis_sizes or {})
    free = [name for name, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ShardingError(f"mesh sizes {sizes}: sizes must be positive, at most one may be -1")
    if free:
        if num_devices % fixed:
            raise ShardingError(f"mesh {sizes} does not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                            f"{num_devices} are available")
    return sizes


def make_mesh(axis_sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes MESH_AXES; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(axis_sizes, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_spec(rules: Rules) -> PartitionSpec:
    """The PartitionSpec of every batch array: its leading (row) axis by the rule for 'batch'."""
    return PartitionSpec(dict(rules).get("batch"))


@contextlib.contextmanager
def rules_context(rules: Rules) -> Iterator[None]:
    """Makes `rules` the ones `constrain` (and flax's logical-axis helpers) use."""
    with flax_spmd.logical_axis_rules(tuple(rules)):
        yield


def mesh_context(mesh: Mesh | None, rules: Rules):
    """`mesh` and `rules` in force (a null context without a mesh): how a jitted step is run."""
    if mesh is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(rules_context(rules))
    return stack


def put_replicated(x, mesh: Mesh | None) -> jax.Array:
    """A host array as a step's input: a copy (the caller may change its array in place),
    replicated over `mesh` as a global array (what a multi-process mesh needs), or on the default
    device without one."""
    x = np.array(x)
    if mesh is None:
        return jax.numpy.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()),
                                        lambda index: x[index])


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules,
             *, what: str = "array", strict: bool = True) -> PartitionSpec:
    """PartitionSpec for an array of `shape` with logical axis `names`.

    A dimension that the mesh axes do not divide is an error when `strict` (params: fix the
    mesh or rules) and stays replicated otherwise (activations, e.g. a batch of 1 in eval).
    """
    table = dict(rules)
    if len(names) != len(shape):
        raise ShardingError(f"{what}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
    spec, used = [], set()
    for dim, name in zip(shape, names):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)  # size-1 axes change nothing
        if used & set(axes):
            raise ShardingError(f"{what}: mesh axes {axes} used twice in {tuple(names)}")
        if dim % math.prod(mesh.shape[a] for a in axes):
            if strict:
                raise ShardingError(f"{what}: dimension {name!r} of size {dim} is not divisible by "
                                    f"mesh axes {axes} {[mesh.shape[a] for a in axes]}")
            axes = ()
        used |= set(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A NamedSharding for every Variable of an nnx State (concrete or abstract), from its names."""
    def one(path, var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        where = ".".join(str(getattr(k, "key", k)) for k in path)
        return NamedSharding(mesh, spec_for(var.shape, names, mesh, rules, what=f"param {where}"))

    return jax.tree_util.tree_map_with_path(
        one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their target sharding (what orbax restores onto, what
    `jit(...).lower` takes)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh and rules; else x."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = flax_spmd.get_logical_axis_rules() or DEFAULT_RULES
    return jax.lax.with_sharding_constraint(
        x, spec_for(x.shape, names, mesh, rules, what="activation", strict=False))
