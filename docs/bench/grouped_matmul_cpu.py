"""What limits the MoE train step on CPU: jax.lax.ragged_dot against a tiled grouped matmul and a dense
matmul of the same FLOPs (docs/benchmarks.md, "Mixture of experts against transformers' Mixtral").

    python docs/bench/grouped_matmul_cpu.py

The operands are one expert projection of the small MoE shape: 2048 tokens x 2 assignments = 4096 rows
of width 384, sorted by 8 experts of [384, 768], with random group sizes. On CPU, jax lowers ragged_dot
to a dense computation: each row is masked into a [rows, experts * 384] operand and multiplied with
all experts' weights stacked, experts times the FLOPs (print the compiled HLO to see it). "tiled"
pads each group to a multiple of 128 rows, so every 128-row tile belongs to one expert, and scans
over the tiles; that is the work megablox does on TPU, written in XLA. Forward and forward+backward,
fastest of 5, all exact against a numpy loop over the groups.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

TOKENS, K, D, F, E, TILE = 2048, 2, 384, 768, 8, 128


def ragged(x, w, sizes):
    return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)


def tiled(x, w, sizes):
    """Groups padded to TILE rows; a scan over the (static bound of) tiles, each times its expert."""
    rows, groups = x.shape[0], w.shape[0]
    tiles = rows // TILE + groups
    padded = (sizes + TILE - 1) // TILE * TILE
    start, padded_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    group = jnp.repeat(jnp.arange(groups), sizes, total_repeat_length=rows)
    slot = padded_start[group] + jnp.arange(rows) - start[group]  # each row's place in the padded layout
    buf = jnp.zeros((tiles * TILE, x.shape[1]), x.dtype).at[slot].set(x)
    tile_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(tiles) * TILE, side="right"), groups - 1)
    _, out = jax.lax.scan(lambda _, a: (None, a[0] @ w[a[1]]), None, (buf.reshape(tiles, TILE, -1), tile_group))
    return out.reshape(tiles * TILE, -1)[slot]


def dense(x, w, sizes):
    return x @ w[0]


def fastest(fn, args, reps=5):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    rng = np.random.default_rng(0)
    rows = TOKENS * K
    sizes = np.bincount(rng.integers(0, E, rows), minlength=E).astype(np.int32)
    x = rng.standard_normal((rows, D)).astype(np.float32)
    w = (0.05 * rng.standard_normal((E, D, F))).astype(np.float32)
    ends = np.cumsum(sizes)
    want = np.concatenate([x[e - s : e] @ w[g] for g, (s, e) in enumerate(zip(sizes, ends))])
    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes))
    gflop = 2 * rows * D * F / 1e9
    for name, fn in (("ragged_dot", ragged), ("tiled", tiled), ("dense, same FLOPs", dense)):
        err = np.abs(np.asarray(jax.jit(fn)(*args)) - want).max() if fn is not dense else float("nan")
        fwd = fastest(fn, args)
        both = fastest(jax.grad(lambda x, w, s, fn=fn: (fn(x, w, s) ** 2).sum(), argnums=(0, 1)), args)
        rates = f"{gflop / fwd * 1e3:.0f} / {3 * gflop / both * 1e3:.0f} useful GFLOP/s"
        print(f"{name}: forward {fwd:.1f} ms, forward+backward {both:.1f} ms ({rates}), max err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
