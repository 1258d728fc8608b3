"""TPU splash attention (Pallas): causal, segment-aware, never materialising the [T, T] scores.

Selected with model.attention_impl=splash. Off TPU it runs in Pallas interpret mode, which is slow
but exact, so the CPU tests check it against the XLA path. Under a mesh the kernel runs per shard
(shard_map): batch over the batch axes, heads over the tensor axis.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from sharding.rules import map_over_shards


def _kernel_call(q, k, v, segment_ids, *, block: int, interpret: bool):
    """q, k, v: [batch, heads, length, head_dim] (k/v already repeated to all heads)."""
    heads, length = q.shape[1], q.shape[2]
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length)) for _ in range(heads)])
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(kernel)(q, k, v, segment_ids=splash.SegmentIds(q=segment_ids, kv=segment_ids))


def splash_attention(q, k, v, segment_ids):
    """q: [batch, length, heads, head_dim], k/v: [batch, length, kv_heads, head_dim]; segment_ids: [batch, length]."""
    heads, kv_heads, head_dim, length = q.shape[2], k.shape[2], q.shape[3], q.shape[1]
    q = (q * head_dim**-0.5).transpose(0, 2, 1, 3)  # the kernel does not scale
    k = jnp.repeat(k, heads // kv_heads, axis=2).transpose(0, 2, 1, 3)
    v = jnp.repeat(v, heads // kv_heads, axis=2).transpose(0, 2, 1, 3)
    block = min(512, length)
    if length % block:
        raise ValueError(f"splash attention needs the sequence length ({length}) to be a multiple of {block}")
    call = functools.partial(_kernel_call, block=block, interpret=jax.devices()[0].platform != "tpu")
    qkv = ("batch", "heads", "length", "head_dim")
    out = map_over_shards(call, (q, k, v, segment_ids.astype(jnp.int32)), (qkv, qkv, qkv, ("batch", "length")), qkv)
    return out.transpose(0, 2, 1, 3)
