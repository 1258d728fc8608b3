"""Attention in plain XLA: causal self-attention by query blocks, and one decode step over a
heads-major KV cache. The fallback on every platform and the only kernel on CPU."""

import jax
import jax.numpy as jnp


def _causal_mask(segment_ids, q_lo: int, q_hi: int, kv_lo: int, kv_hi: int, sliding_window=None) -> jax.Array:
    """bool [batch, q_hi - q_lo, kv_hi - kv_lo]: the causal, same-document (and window) mask of
    queries [q_lo, q_hi) against keys [kv_lo, kv_hi) of one sequence."""
    q, kv = jnp.arange(q_lo, q_hi)[:, None], jnp.arange(kv_lo, kv_hi)[None, :]
    causal = q >= kv
    if sliding_window is not None:
        causal = causal & (q - kv < sliding_window)
    same_doc = segment_ids[:, q_lo:q_hi, None] == segment_ids[:, None, kv_lo:kv_hi]
    return causal[None] & same_doc


CACHE_LENGTH_AXIS = -2  # the KV cache is heads-major: [..., kv_heads, cache_length, head_dim]


def heads_major(x: jax.Array) -> jax.Array:
    """[batch, length, heads, head_dim] -> [batch, heads, length, head_dim]."""
    return x.transpose(0, 2, 1, 3)


def attend(q, k, v, mask, *, scale=None, softcap=None, own=None):
    """Softmax attention on heads-major arrays, the form XLA's batched matmuls take without copies.

    q: [batch, kv_heads, group, q_len, head_dim] (GQA: the query heads of each kv head grouped, K/V
    never repeated); k, v: [batch, kv_heads, kv_len, head_dim]; mask: bool, broadcastable to
    [batch, 1, 1, q_len, kv_len]. Scores and softmax are float32, as in transformers' eager
    attention. Returns [batch, kv_heads, group, q_len, head_dim].
    own: (k, v) [batch, kv_heads, q_len, head_dim] of the queries' own tokens, which each query
    attends besides k/v. A decode step passes its token this way instead of reading it back from the
    cache it is writing: a read after the write made XLA copy every layer's cache every step.
    """
    batch, kv_heads, group, q_len, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale

    def capped(scores):
        scores = scores * scale
        return scores if softcap is None else softcap * jnp.tanh(scores / softcap)

    # The group and query axes are merged for the matmuls and the softmax (XLA:CPU runs a separate
    # group axis slower).
    rows = (batch, kv_heads, group * q_len)
    scores = capped(jnp.einsum("bkxd,bksd->bkxs", q.reshape(*rows, head_dim), k, preferred_element_type=jnp.float32))
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, group, q_len, mask.shape[-1]))
    mask = mask.reshape(mask.shape[0], 1, *rows[2:], -1)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    if own is not None:
        own_k, own_v = own
        own_scores = jnp.einsum("bkgqd,bkqd->bkgq", q, own_k, preferred_element_type=jnp.float32)
        scores = jnp.concatenate([scores, capped(own_scores).reshape(*rows, 1)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if own is None:
        return jnp.einsum("bkxs,bksd->bkxd", probs, v).reshape(batch, kv_heads, group, q_len, head_dim)
    out = jnp.einsum("bkxs,bksd->bkxd", probs[..., :-1], v).reshape(batch, kv_heads, group, q_len, head_dim)
    return out + probs[..., -1].reshape(batch, kv_heads, group, q_len, 1) * own_v[:, :, None]


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [batch, length, heads, head_dim] -> [batch, kv_heads, group, length, head_dim] for `attend`."""
    batch, length, heads, head_dim = q.shape
    return q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)


def ungroup_queries(out: jax.Array) -> jax.Array:
    """`attend`'s [batch, kv_heads, group, length, head_dim] -> [batch, length, heads, head_dim]."""
    batch, kv_heads, group, length, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, kv_heads * group, head_dim)


def query_blocks(length: int) -> int:
    """How many query blocks causal XLA attention splits a sequence into: blocks of at least 64
    queries, at most 8 of them, dividing the length."""
    n = max(1, min(8, length // 64))
    while length % n:
        n -= 1
    return n


def causal_xla_attention(q, k, v, segment_ids, *, sliding_window=None, scale=None, softcap=None):
    """Causal self-attention in plain XLA, one block of queries at a time.

    Block i (queries [i*b, (i+1)*b)) attends key blocks 0..i only, so the masked upper triangle
    is mostly never computed: 4 blocks skip 3/8 of the scores' FLOPs and bytes. A static sliding
    window also drops the key blocks wholly before every query's window. Each block's keys are a
    concatenation of `jnp.split` blocks, not a prefix slice: a prefix slice's gradient is padded to
    the whole length and summed in the backward pass.
    q: [batch, length, heads, head_dim], k/v: [batch, length, kv_heads, head_dim], segment_ids:
    [batch, length] (0 = padding).
    """
    length, kv_heads = q.shape[1], k.shape[2]
    n = query_blocks(length)
    size = length // n
    qs = jnp.split(group_queries(q, kv_heads), n, axis=3)
    ks, vs = jnp.split(heads_major(k), n, axis=2), jnp.split(heads_major(v), n, axis=2)
    static_window = isinstance(sliding_window, int)
    outs = []
    for i in range(n):
        first = max(0, i * size - sliding_window + 1) // size if static_window else 0
        mask = _causal_mask(segment_ids, i * size, (i + 1) * size, first * size, (i + 1) * size, sliding_window)
        keys, values = (ks[first], vs[first]) if first == i else (
            jnp.concatenate(ks[first : i + 1], axis=2), jnp.concatenate(vs[first : i + 1], axis=2))  # fmt: skip
        outs.append(attend(qs[i], keys, values, mask[:, None, None], scale=scale, softcap=softcap))
    return ungroup_queries(jnp.concatenate(outs, axis=3) if n > 1 else outs[0])


def cached_attention(q, cache_k, cache_v, positions, own, *, sliding_window=None, scale=None, softcap=None):
    """One decode step: each row's single query over its cache slots before `positions`, plus its
    own token's key and value (`own`), which the caller writes to the cache afterwards.

    q: [batch, 1, heads, head_dim]; cache_k/v: [batch, kv_heads, cache_length, head_dim];
    positions: int [batch]; own: (k, v) [batch, kv_heads, head_dim]. Returns [batch, 1, heads, head_dim].
    """
    slots = jnp.arange(cache_k.shape[CACHE_LENGTH_AXIS])[None, :]
    mask = slots < positions[:, None]
    if sliding_window is not None:
        mask = mask & (positions[:, None] - slots < sliding_window)
    own = tuple(x[:, :, None].astype(q.dtype) for x in own)
    out = attend(group_queries(q, cache_k.shape[1]), cache_k.astype(q.dtype), cache_v.astype(q.dtype),
                 mask[:, None, None, None], scale=scale, softcap=softcap, own=own)  # fmt: skip
    return ungroup_queries(out)


def chunk_attention(q, cache_k, cache_v, positions, *, sliding_window=None, scale=None, softcap=None):
    """A chunk of prompt queries over the cache that already holds their keys: each query sees the
    slots up to its own position (and within the window). Scores are [chunk, cache_length] per head,
    so memory follows the chunk, not the square of the prompt.

    q: [batch, chunk, heads, head_dim]; cache_k/v: [batch, kv_heads, cache_length, head_dim];
    positions: int [batch, chunk]. Returns [batch, chunk, heads, head_dim].
    """
    slots = jnp.arange(cache_k.shape[CACHE_LENGTH_AXIS])[None, None, :]
    mask = slots <= positions[:, :, None]
    if sliding_window is not None:
        mask = mask & (positions[:, :, None] - slots < sliding_window)
    out = attend(group_queries(q, cache_k.shape[1]), cache_k.astype(q.dtype), cache_v.astype(q.dtype),
                 mask[:, None, None], scale=scale, softcap=softcap)  # fmt: skip
    return ungroup_queries(out)
