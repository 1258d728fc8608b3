"""Causal self-attention with the sequence split over the mesh axes of the `length` rule
(`mesh.context`: context parallelism), and the zig-zag order that balances its causal work.

Each device holds a slice of the queries, keys and values. Which key a query may see is decided by
positions and segment ids, never by where a token sits in the array: within a document positions
rise by one per token (lm.data packs documents that way), so `key position <= query position` in
the same document is exactly the causal mask, in any order of the tokens. That is what lets the
sequence be reordered (`zigzag`) without changing a number.

Two modes (model.context_parallel):
  allgather  K/V (with their positions and segment ids) gathered whole on every device; each device
             attends its queries to all of them. One collective per layer; K/V of the whole
             sequence in memory.
  ring       K/V blocks passed around the devices with `ppermute`, the next block in flight while
             the current one is attended. Memory holds two K/V blocks at a time.
Both merge keys KEY_BLOCK at a time with an online softmax (running max, sum and output), so the
scores in memory are [local queries, KEY_BLOCK] per head, never [T, T]; each merge is
rematerialised in the backward pass, so what is saved for it is its K/V, not its scores. A key block
that no local query may see (causally after all of them, or outside every window) is skipped by
`lax.cond`: under zig-zag order about half the blocks of a causal sequence are, and the result is
the same to the bit, since such a block leaves the running state unchanged.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.kernels.xla import group_queries, ungroup_queries
from sharding.rules import current_rules, logical_to_spec

Q_NAMES = ("batch", "length", "heads", "head_dim")
KV_NAMES = ("batch", "length", "kv_heads", "head_dim")
TOKEN_NAMES = ("batch", "length")


def context_axes(length: int | None = None) -> tuple[str, ...]:
    """The mesh axes that split a sequence of `length` here (the `length` rule under the enclosing
    mesh and rules; those that divide it); () when it is not split. length=None: every axis the
    rule names, whatever the length."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not current_rules():
        return ()
    shape = None if length is None else (length,)
    (axes,) = logical_to_spec(("length",), shape=shape, mesh=mesh if shape else None)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if mesh.shape[a] > 1)


def context_size(length: int | None = None) -> int:
    """How many devices share one sequence of `length` (1: no context parallelism); length=None:
    how many would share a sequence whose length they divide."""
    mesh = jax.sharding.get_abstract_mesh()
    return int(np.prod([mesh.shape[a] for a in context_axes(length)], dtype=int))


def _mask(seg_q, pos_q, seg_k, pos_k, sliding_window):
    """bool [batch, q, k]: same document, key not after the query (and within the window)."""
    pq, pk = pos_q[:, :, None], pos_k[:, None, :]
    mask = (seg_q[:, :, None] == seg_k[:, None, :]) & (pk <= pq)
    if sliding_window is not None:
        mask = mask & (pq - pk < sliding_window)
    return mask


KEY_BLOCK = 512  # keys per score block: a device holds [its queries, KEY_BLOCK] scores per head at a time


def _online_softmax(q, seg, pos, kv_heads, *, sliding_window, scale, softcap):
    """(initial state, merge, finish) of an online softmax (a running max, sum and output per query)
    of the local queries over K/V that arrive in blocks.

    merge(state, block) takes a block (k, v [batch, keys, kv_heads, head_dim], their segment ids and
    positions [batch, keys]) KEY_BLOCK keys at a time, so the scores stay [queries, KEY_BLOCK].
    The key blocks are a lax.scan whose body is rematerialised: the backward pass recomputes one
    block at a time (unrolled, XLA:CPU scheduled every recomputation at once and memory grew with the
    square of the length). finish(state) is the attention output [batch, length, heads, head_dim].
    """
    qg = group_queries(q, kv_heads).astype(jnp.float32)  # [batch, kv_heads, group, length, head_dim]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    low = jnp.finfo(jnp.float32).min

    def attend(state, block, mask):
        m, total, acc = state
        kb, vb = block[:2]
        s = jnp.einsum("bkgqd,bskd->bkgqs", qg, kb.astype(jnp.float32)) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        s = jnp.where(mask, s, low)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p, vb.astype(jnp.float32))
        return m_new, total * correction + p.sum(-1), acc

    @jax.checkpoint
    def step(state, block):
        mask = _mask(seg, pos, *block[2:], sliding_window)[:, None, None]
        # A block no local query may see (all of it after them, another document, outside the window)
        # would leave the state as it is: skipped, it costs the mask and no matmul, forward or backward.
        return jax.lax.cond(mask.any(), attend, lambda state, *_: state, state, block, mask), None

    def merge(state, block):
        keys = block[0].shape[1]
        n = -(-keys // KEY_BLOCK)
        while keys % n:
            n += 1
        stacked = [jnp.moveaxis(x.reshape(x.shape[0], n, keys // n, *x.shape[2:]), 1, 0) for x in block]
        return jax.lax.scan(step, state, stacked)[0]

    def finish(state):
        _, total, acc = state
        return ungroup_queries((acc / total[..., None]).astype(q.dtype))

    return (jnp.full(qg.shape[:-1], low), jnp.zeros(qg.shape[:-1]), jnp.zeros(qg.shape)), merge, finish


def _allgather(q, k, v, seg, pos, *, axes, **options):
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
    state, merge, finish = _online_softmax(q, seg, pos, k.shape[2], **options)
    return finish(merge(state, (gather(k), gather(v), gather(seg), gather(pos))))


def _ring(q, k, v, seg, pos, *, axes, n, **options):
    state, merge, finish = _online_softmax(q, seg, pos, k.shape[2], **options)
    ring = [(i, (i + 1) % n) for i in range(n)]

    def step(carry, _):
        state, block = carry
        # The next block is sent before this one is merged, so the transfer can overlap the work.
        incoming = jax.lax.ppermute(block, axes, ring)
        return (merge(state, block), incoming), None

    # n - 1 blocks arrive; a scan over them, so their backward passes too run one after another.
    (state, last), _ = jax.lax.scan(step, (state, (k, v, seg, pos)), None, length=n - 1)
    return finish(merge(state, last))


def context_attention(q, k, v, segment_ids, positions, *, mode="allgather", sliding_window=None, scale=None,
                      softcap=None):  # fmt: skip
    """Causal self-attention over a sequence split by the `length` rule (see the module docstring).

    q: [batch, length, heads, head_dim], k/v: [batch, length, kv_heads, head_dim], segment_ids and
    positions: int [batch, length], all global arrays laid out by their logical names.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = context_axes(q.shape[1])
    q_spec = logical_to_spec(Q_NAMES, shape=q.shape, mesh=mesh)
    kv_spec = logical_to_spec(KV_NAMES, shape=k.shape, mesh=mesh)
    if kv_spec[2] != q_spec[2]:  # the tensor axis splits query heads but not the fewer K/V heads
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    token_spec = logical_to_spec(TOKEN_NAMES, shape=positions.shape, mesh=mesh)
    options = dict(axes=axes, sliding_window=sliding_window, scale=scale, softcap=softcap)
    if mode == "ring":
        fn = functools.partial(_ring, n=context_size(q.shape[1]), **options)
    else:
        fn = functools.partial(_allgather, **options)
    specs = (q_spec, kv_spec, kv_spec, token_spec, token_spec)
    return jax.shard_map(fn, in_specs=specs, out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, positions)


def zigzag(length: int, n: int) -> np.ndarray:
    """The permutation that gives each of n devices equal causal work: the sequence cut into 2n
    chunks, device i holding chunks i and 2n - 1 - i (an early, cheap one and a late, costly one).
    x[..., zigzag(T, n)] is the reordered sequence; positions go with it."""
    if length % (2 * n):
        raise ValueError(f"zig-zag needs a length divisible by 2 * {n}, got {length}")
    chunks = np.arange(length).reshape(2 * n, length // (2 * n))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def unzigzag(length: int, n: int) -> np.ndarray:
    """The inverse permutation of zigzag(length, n)."""
    return np.argsort(zigzag(length, n))


def balance(batch: dict) -> dict:
    """The batch ([batch, length] arrays: tokens, targets, positions, segment ids, weights) in
    zig-zag order when the sequence is split over devices (and splits evenly); unchanged otherwise.
    Attention reads positions and segment ids, and the loss is a sum over tokens, so neither changes."""
    length = batch["tokens"].shape[1]
    n = context_size(length)
    if n == 1 or length % (2 * n):
        return batch
    order = zigzag(length, n)
    return {k: jnp.take(x, order, axis=1) if x.ndim >= 2 and x.shape[1] == length else x for k, x in batch.items()}
