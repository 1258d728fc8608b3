"""TPU splash attention (Pallas): causal, segment-aware, never materialising the [T, T] scores.

Chosen by model.attention_impl=auto on TPU (or =splash). `splash_interpret` runs the same kernel in
the Pallas interpreter, slow but exact, which is how the CPU tests check it against XLA; nothing
switches to the interpreter on its own. Under a mesh the kernel runs per shard (shard_map): batch
over the batch axes, heads over the tensor axis. Under context parallelism (lm.kernels.context),
allgather runs each shard's queries (zig-zag or natural order) against the gathered keys, with a kernel
built for the whole sequence whose mask knows that order (make_kernel's q_order and q_shards); a ring
runs a causal or mask-free kernel per chunk pair (`pair_forward`, `pair_backward`).

The real kernel needs its key/value compute block to be a multiple of 128, so sequences are padded
to a multiple of 128 (segment id 0: padding attends only to padding) and sliced back afterwards.
Grouped-query attention is native: K/V keep their own heads and each query head reads its group's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from sharding.rules import logical_to_spec, map_over_shards

LANES = 128  # TPU vector lane width: the kernel's kv compute block must be a multiple of it
MAX_BLOCK = 512


def padded_length(length: int) -> int:
    return -(-length // LANES) * LANES


def block_size(padded: int) -> int:
    """512, or the largest multiple of 128 that divides the padded length."""
    return max(b for b in range(LANES, MAX_BLOCK + 1, LANES) if padded % b == 0)


def make_kernel(length: int, heads: int, *, block: int, window: int | None, softcap: float | None, interpret: bool,
                q_order=None, q_shards: int = 1, full: bool = False, save_residuals: bool = False):  # fmt: skip
    """The splash kernel for `heads` query heads over a causal (or sliding-window) [length, length] mask.

    q_order: the original index of each query row when the queries are reordered (the zig-zag order
    of context parallelism; keys are in natural order), default natural. q_shards: how many devices
    split the query rows; each then takes its slice of the kernel (`manual_sharding_spec`).
    full: no causal mask (keys all before the queries: a ring's earlier chunks). save_residuals: the
    kernel also returns each query's log-sum-exp (for `pair_forward`)."""
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    if full:
        one = splash_mask.FullMask((length, length))
    elif window is None:
        one = splash_mask.CausalMask((length, length))
    else:  # itself and the window - 1 keys before it
        one = splash_mask.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    if q_order is not None:
        one.q_sequence = np.asarray(q_order, np.int32)
    mask = splash_mask.MultiHeadMask([one for _ in range(heads)])
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=q_shards, attn_logits_soft_cap=softcap,
        interpret=interpret, save_residuals=save_residuals,
    )  # fmt: skip


def pair_forward(kernel, q, k, v, q_segments, kv_segments):
    """One block pair of a ring: a kernel made with save_residuals=True over a batch (as `apply`).
    Returns the output [batch, heads, queries, head_dim] and the log-sum-exp [batch, heads, queries]
    (very negative where a query sees none of these keys: its output then gets no weight in a merge)."""
    out, (lse,) = apply(kernel, q, k, v, q_segments, kv_segments)
    return out, lse


def pair_backward(kernel, q, k, v, q_segments, kv_segments, out, lse, d_out):
    """dq, dk, dv of one block pair from the *merged* output and log-sum-exp of all of a query's
    keys (flash attention's backward pass per block): splash's own backward pass, handed the merged
    statistics instead of the pair's. dq is with respect to the (scaled) q the kernel took."""
    options = kernel.kwargs

    def collapsed(info):  # as splash's own entry point hands the mask blocks to its kernels
        if info is None or info.partial_mask_blocks is None:
            return info
        blocks = info.partial_mask_blocks
        return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))

    infos = [collapsed(info) for info in (kernel.dq_mask_info, kernel.dkv_mask_info)]

    def one(q, k, v, q_segments, kv_segments, out, lse, d_out):
        segments = splash.SegmentIds(q=q_segments.astype(jnp.int32), kv=kv_segments.astype(jnp.int32))
        grads = splash._splash_attention_bwd(
            False, options["mask_value"], options["is_mqa"], options["block_sizes"], None, options["mask_function"],
            options["attn_logits_soft_cap"], options["interpret"],
            (q, k, v, segments, None, out, lse, *infos), d_out,
        )  # fmt: skip
        return grads[3:6]

    return jax.vmap(one)(q, k, v, q_segments, kv_segments, out, lse, d_out)


def _kernel_call(q, k, v, segment_ids, *, block: int, window: int | None, softcap: float | None, interpret: bool):
    """q: [batch, heads, length, head_dim], k/v: [batch, kv_heads, length, head_dim]; one shard's worth."""
    kernel = make_kernel(q.shape[2], q.shape[1], block=block, window=window, softcap=softcap, interpret=interpret)
    return apply(kernel, q, k, v, segment_ids, segment_ids)


def apply(kernel, q, k, v, q_segments, kv_segments):
    """A kernel from make_kernel over a batch: q [batch, heads, queries, head_dim] (already scaled),
    k/v [batch, kv_heads, keys, head_dim], segment ids int [batch, queries] and [batch, keys]."""
    segments = splash.SegmentIds(q=q_segments.astype(jnp.int32), kv=kv_segments.astype(jnp.int32))
    return jax.vmap(kernel)(q, k, v, segment_ids=segments)


def _head_shards(names, shape) -> int:
    """How many ways the heads axis (dimension 1) of an array with these logical names is split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = logical_to_spec(names, shape=shape, mesh=mesh)[1]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return functools.reduce(lambda n, a: n * mesh.shape[a], axes, 1)


def splash_attention(
    q, k, v, segment_ids, *, scale=None, softcap=None, sliding_window=None, interpret: bool = False
):  # fmt: skip
    """q: [batch, length, heads, head_dim], k/v: [batch, length, kv_heads, head_dim]; segment_ids: [batch, length]."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    padded = padded_length(length)
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q = jnp.pad(q * scale, pad).transpose(0, 2, 1, 3)  # the kernel does not scale
    k = jnp.pad(k, pad).transpose(0, 2, 1, 3)
    v = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - length)))
    q_names = ("batch", "heads", "length", "head_dim")
    kv_names = ("batch", "kv_heads", "length", "head_dim")
    if _head_shards(q_names, q.shape) != _head_shards(kv_names, k.shape):
        # Query heads are split more ways than K/V heads (tensor axis > kv_heads): each shard's
        # query heads then need their own K/V heads, so repeat them to one per query head.
        k, v = (jnp.repeat(x, heads // kv_heads, axis=1) for x in (k, v))
        kv_names = q_names
    call = functools.partial(
        _kernel_call, block=block_size(padded), window=sliding_window, softcap=softcap, interpret=interpret
    )
    out = map_over_shards(call, (q, k, v, segment_ids), (q_names, kv_names, kv_names, ("batch", "length")), q_names)
    return out.transpose(0, 2, 1, 3)[:, :length]
