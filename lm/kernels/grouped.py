"""Grouped matmul for mixture-of-experts layers: rows sorted by expert, each group times its expert.

`ragged_dot` is XLA's (any platform). `megablox` is the Pallas TPU kernel (jax's
`pallas.ops.tpu.megablox`, with its own backward pass); it needs the row count and both matrix
widths to be multiples of its 128-wide tiles, so rows are padded to a tile and the padding is put
in no group. `megablox_interpret` runs the same kernel in the Pallas interpreter (tests, any platform).
"""

import jax
import jax.numpy as jnp

TILE = 128


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)


def megablox_fits(lhs_shape, rhs_shape) -> bool:
    """Whether the kernel's tiles divide the matrix widths (the rows are padded, the widths are not)."""
    return rhs_shape[1] % TILE == 0 and rhs_shape[2] % TILE == 0


def megablox(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, interpret: bool = False) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.megablox import ops

    rows = lhs.shape[0]
    pad = -rows % TILE
    out = ops.gmm(jnp.pad(lhs, ((0, pad), (0, 0))), rhs, group_sizes.astype(jnp.int32),
                  jnp.float32, (TILE, TILE, TILE), None, None, False, interpret)  # fmt: skip
    # The kernel never writes rows in no group (padding, or rows past the groups): zero them, as ragged_dot does.
    grouped = jnp.arange(rows)[:, None] < group_sizes.sum()
    return jnp.where(grouped, out[:rows], 0).astype(lhs.dtype)
