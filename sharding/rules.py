"""The one table that maps logical axis names to mesh axes, and the helpers that read it."""

from collections.abc import Sequence

import jax
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None

# Parameter axes: vocab, embed, heads, kv_heads, head_dim, mlp, expert, expert_mlp, norm, layers, position.
# Activation axes: batch, length, embed, heads, kv_heads, mlp, vocab, cache_length.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "context"),  # context parallelism: each device holds a slice of the sequence
    ("cache_length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),  # experts of an MoE layer's kernels
    ("expert_mlp", "tensor"),  # each expert's hidden width
    ("vocab", "tensor"),
    ("norm", None),
    ("position", None),
    ("layers", None),  # required: without it nnx.get_abstract_model fails ("Resource axis: layers")
)


def axes(*names: str | None) -> dict:
    """Logical axis names as a Variable's metadata (`kernel_metadata=axes("embed", "mlp")`).

    Variables are placed by `sharding.partition` (abstract init, then a jit with out_shardings),
    never eagerly where they are created, so a model can also be built with no mesh at all."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def logical_rules(overrides: Sequence[tuple[str, MeshAxes]] = ()) -> tuple[tuple[str, MeshAxes], ...]:
    """DEFAULT_RULES with the recipe's overrides applied (an override replaces a name's mapping)."""
    table = dict(DEFAULT_RULES)
    for name, axes in overrides:
        table[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(table.items())


def current_rules() -> tuple[tuple[str, MeshAxes], ...]:
    """The rules of the enclosing `nnx.logical_axis_rules` context (empty outside one)."""
    return tuple(flax_spmd.get_logical_axis_rules())


def logical_to_spec(names: Sequence[str | None], rules=None, shape: Sequence[int] | None = None, mesh=None) -> P:
    """PartitionSpec for a tuple of logical names under `rules` (default: the enclosing context's).

    A mesh axis shards at most one dimension; the first dimension that claims it keeps it. So an
    activation [batch, length, embed] is split over (data, fsdp) by batch and not again by embed,
    while a parameter [embed, mlp] still puts embed on fsdp. Given `shape` and `mesh`, axes that
    do not divide a dimension are left out (for activations such as a batch-1 decode; parameters
    are checked for divisibility up front instead).
    """
    table = dict(current_rules() if rules is None else rules)
    used, spec = set(), []
    for dim, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        free, size = [], 1
        for a in axes:
            if a in used:
                continue
            if shape is not None and shape[dim] % (size * mesh.shape[a]):
                break
            free.append(a)
            size *= mesh.shape[a] if mesh is not None else 1
        used.update(free)
        spec.append(None if not free else free[0] if len(free) == 1 else tuple(free))
    return P(*spec)


def logical_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names. A no-op when no mesh or rules are active,
    so model code can call it unconditionally (single device, tests, export)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not current_rules():
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, shape=x.shape, mesh=mesh))


__all__ = ["DEFAULT_RULES", "logical_rules", "logical_to_spec", "logical_constraint", "current_rules"]


def map_over_shards(fn, args, in_names, out_names):
    """Call fn on each device's shard of args (laid out by logical names) when a mesh and rules are
    active, as Pallas kernels require; call it on the whole arrays otherwise. The output has the
    first argument's shape."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not current_rules():
        return fn(*args)
    in_specs = tuple(logical_to_spec(n, shape=a.shape, mesh=mesh) for n, a in zip(in_names, args, strict=True))
    out_spec = logical_to_spec(out_names, shape=args[0].shape, mesh=mesh)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)
