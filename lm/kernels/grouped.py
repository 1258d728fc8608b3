"""Grouped matmul for mixture-of-experts layers: rows sorted by expert, each group times its expert.

`ragged_dot` is XLA's (any platform). `megablox` is the Pallas TPU kernel (jax's
`pallas.ops.tpu.megablox`, with its own backward pass); it needs the row count and both matrix
widths to be multiples of its 128-wide tiles, so rows are padded to a tile and the padding is put
in no group. `megablox_interpret` runs the same kernel in the Pallas interpreter (tests, any platform).
`tiled` is megablox's tiling written in XLA, for CPU: there XLA lowers `ragged_dot` to a masked matmul
against every group stacked, groups times the FLOPs (80% of a small MoE train step, docs/benchmarks.md).
"""

from typing import NamedTuple

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


class _Tiles(NamedTuple):
    """Where each row goes when every group is padded to whole tiles (one group per tile)."""

    slot: jax.Array  # [rows]: the row's place in the padded layout; out of range for rows in no group
    grouped: jax.Array  # [rows] bool
    tile_group: jax.Array  # [n_tiles]: the group each tile belongs to (tiles past the groups: the last)
    tile: int
    n_tiles: int

    def pad(self, x: jax.Array) -> jax.Array:
        """[rows, d] -> [n_tiles, tile, d], rows in no group dropped."""
        buf = jnp.zeros((self.n_tiles * self.tile, x.shape[1]), x.dtype).at[self.slot].set(x, mode="drop")
        return buf.reshape(self.n_tiles, self.tile, -1)

    def unpad(self, tiles: jax.Array) -> jax.Array:
        out = tiles.reshape(self.n_tiles * self.tile, -1)[jnp.minimum(self.slot, self.n_tiles * self.tile - 1)]
        return jnp.where(self.grouped[:, None], out, 0)


def _tiles(rows: int, groups: int, group_sizes: jax.Array) -> _Tiles:
    tile = min(TILE, max(8, 1 << (-(-rows // groups) - 1).bit_length()))  # about a group's rows
    n_tiles = rows // tile + groups  # sum(ceil(size / tile)) is at most this
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + tile - 1) // tile * tile
    start, padded_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    row = jnp.arange(rows)
    group = jnp.searchsorted(jnp.cumsum(sizes), row, side="right")  # == groups past the last group
    grouped = group < groups
    group = jnp.minimum(group, groups - 1)
    slot = jnp.where(grouped, padded_start[group] + row - start[group], n_tiles * tile)
    tile_group = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_tiles) * tile, side="right")
    return _Tiles(slot, grouped, jnp.minimum(tile_group, groups - 1), tile, n_tiles)


def _tile_matmul(tiles: jax.Array, rhs: jax.Array, tile_group: jax.Array) -> jax.Array:
    def one(_, xs):
        x, g = xs
        return None, jnp.matmul(x, rhs[g], preferred_element_type=jnp.float32).astype(tiles.dtype)

    return jax.lax.scan(one, None, (tiles, tile_group))[1]


@jax.custom_vjp
def tiled(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Each group's rows padded to whole tiles, so that every tile belongs to one group, and a scan over
    the tiles, each times its group's matrix. Rows past the groups come out zero, as ragged_dot's do.
    The backward pass is written out: autodiff of the scan would add a whole [groups, in, out]
    cotangent at every tile (3x slower than the forward here)."""
    t = _tiles(lhs.shape[0], rhs.shape[0], group_sizes)
    return t.unpad(_tile_matmul(t.pad(lhs), rhs, t.tile_group))


def _tiled_fwd(lhs, rhs, group_sizes):
    return tiled(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _tiled_bwd(res, g):
    lhs, rhs, group_sizes = res
    t = _tiles(lhs.shape[0], rhs.shape[0], group_sizes)
    g_tiles = t.pad(g)
    d_lhs = t.unpad(_tile_matmul(g_tiles, jnp.swapaxes(rhs, 1, 2), t.tile_group))
    per_tile = jnp.einsum("tri,tro->tio", t.pad(lhs), g_tiles, preferred_element_type=jnp.float32)
    d_rhs = jax.ops.segment_sum(per_tile, t.tile_group, num_segments=rhs.shape[0]).astype(rhs.dtype)
    return d_lhs, d_rhs, None


tiled.defvjp(_tiled_fwd, _tiled_bwd)
