"""Shardings for parameters, optimizer state and batches, plus the divisibility checks."""

import math
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from lm.errors import UserError
from sharding.mesh import Layout
from sharding.rules import current_rules, logical_to_spec


def _mesh_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(dims: Mapping[str, tuple[int, str]], layout: Layout) -> None:
    """Every logical dimension must split evenly over the mesh axes its rule names.

    dims: logical name -> (size, the user-facing key that sets it, e.g. 'model.n_kv_heads').
    XLA would silently replicate or pad an indivisible dimension; we refuse instead, before compiling.
    """
    table, mesh = dict(layout.rules), layout.mesh
    for name, (size, key) in dims.items():
        axes = table.get(name)
        n = _mesh_size(mesh, axes)
        if size % n:
            axes_t = (axes,) if isinstance(axes, str) else axes
            label = "*".join(f"mesh.{a}" for a in axes_t)
            ok = sorted({d for d in range(1, size + 1) if size % d == 0 and d <= n * 8})
            raise UserError(
                f"{key}={size} is not divisible by {label}={n}; choose {label} in {ok} or change the '{name}' rule"
            )


def create_sharded(make: Callable[[], nnx.Module], layout: Layout) -> nnx.Module:
    """Build a module (model, or model + optimizer) directly sharded: no full copy on any device.

    The abstract shapes come from `nnx.eval_shape`; a jit with out_shardings then runs the
    initialisers so that each device materialises only its own shards.
    """
    with layout:
        abstract = nnx.eval_shape(make)
        graphdef, abstract_state = nnx.split(abstract)
        shardings = nnx.get_named_sharding(abstract_state, layout.mesh)

        @jax.jit(out_shardings=shardings)
        def init():
            return nnx.split(make())[1]

        return nnx.merge(graphdef, init())


def batch_sharding(layout: Layout, ndim: int = 2) -> NamedSharding:
    return NamedSharding(layout.mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), layout.rules))


def _held_shards(layout: Layout) -> list[int]:
    """Which of the batch's data x fsdp shards this process's devices hold, in order."""
    shards = layout.batch_devices
    held = batch_sharding(layout, 1).addressable_devices_indices_map((shards,)).values()
    return sorted({index[0].indices(shards)[0] for index in held})


def process_rows(layout: Layout, n_rows: int) -> np.ndarray:
    """The rows of an [n_rows, ...] global batch that this process's devices hold, in order: the rows
    this process loads (lm.data.pipeline). Processes whose devices hold the same batch shards (a
    tensor group that spans processes) load the same rows; n_rows must divide by data x fsdp."""
    per_shard = n_rows // layout.batch_devices
    return np.concatenate([np.arange(s * per_shard, (s + 1) * per_shard) for s in _held_shards(layout)])


def put_batch(local: Mapping[str, np.ndarray], layout: Layout) -> dict[str, jax.Array]:
    """Assemble global arrays from each process's rows: the rows of process_rows, in order."""
    # The global shape is stated, not inferred: jax then checks each process's rows against it.
    scale = layout.batch_devices // len(_held_shards(layout))
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(layout, v.ndim), v, (v.shape[0] * scale, *v.shape[1:]))
        for k, v in local.items()
    }


def to_host(x) -> np.ndarray:
    """The whole value of an array on this host, also when other processes hold parts of it (then a
    collective: every process must call it, in the same order)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place(state):
    """Put a state of annotated Variables (e.g. a fresh KV cache) where its logical names say, under
    the enclosing mesh and rules; a dimension the mesh axes do not divide (a batch of 1) stays whole.
    A no-op with no mesh or no rules (single device)."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty or not current_rules():
        return state

    def sharding(var):
        names = var.get_metadata().get("out_sharding") or (None,) * var.ndim
        return var.replace(NamedSharding(mesh, logical_to_spec(names, shape=var.shape, mesh=mesh)))

    return jax.device_put(state, jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
