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
Inside each shard, allgather runs the splash kernel where the platform's kernel is splash and the
batch was put in zig-zag order by `balanced` (training, eval, scoring: the kernel's mask is static,
so it must know the order at trace time). Otherwise (ring, prefill) both modes merge keys KEY_BLOCK
at a time with an online softmax (running max, sum and output), so the scores in memory are [local queries, KEY_BLOCK] per head, never [T, T]; each merge is
rematerialised in the backward pass, so what is saved for it is its K/V, not its scores. A key block
that no local query may see (causally after all of them, or outside every window) is skipped by
`lax.cond`: under zig-zag order about half the blocks of a causal sequence are, and the result is
the same to the bit, since such a block leaves the running state unchanged.
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.kernels import splash
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


def _allgather_splash(q, k, v, seg, pos, kernel, *, axes, n, scale):
    """allgather with the splash kernel inside the shard: the local queries (zig-zag order, which the
    kernel's mask knows) against the gathered K/V put back in natural order, chunk by chunk. As
    splash without context parallelism, causality is by place in the (natural) sequence and documents
    by segment ids, so `pos` is not read: within a document positions rise by one per token."""

    def gather(x):  # the gathered chunks are zigzag(2n, n) of the sequence's 2n chunks
        x = jax.lax.all_gather(x, axes, axis=1, tiled=True)
        chunks = x.reshape(x.shape[0], 2 * n, x.shape[1] // (2 * n), *x.shape[2:])
        return chunks[:, unzigzag(2 * n, n)].reshape(x.shape)

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads_major = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    q, k, v = heads_major(q * scale), heads_major(gather(k)), heads_major(gather(v))  # the kernel does not scale
    return heads_major(splash.apply(kernel, q, k, v, seg, gather(seg)))


def shard_kernel(
    kernel: str, mode: str, length: int, n: int, sliding_window=None, *, zigzagged: bool | None = None
) -> str:
    """The kernel inside each shard for a sequence of `length` split over n devices: `splash`
    (or `splash_interpret`) where the platform's choice is splash, the mode is allgather, the
    batch is zig-zag ordered (`balanced`: the kernel's mask is static, so the order must be known
    at trace time) and each shard's queries fill whole 128-row blocks; `xla` (the online softmax
    over key blocks) otherwise. zigzagged: whether the batch is in zig-zag order, default what the
    trace says (inside `balanced`); True: wherever balanced would reorder it."""
    zigzagged = _zigzagged(length, n) if zigzagged is None else zigzagged and length % (2 * n) == 0
    fits = kernel.startswith("splash") and mode == "allgather" and (length // n) % splash.LANES == 0
    return kernel if fits and zigzagged and isinstance(sliding_window, int | None) else "xla"


def context_attention(q, k, v, segment_ids, positions, *, mode="allgather", kernel="xla", sliding_window=None,
                      scale=None, softcap=None):  # fmt: skip
    """Causal self-attention over a sequence split by the `length` rule (see the module docstring).

    q: [batch, length, heads, head_dim], k/v: [batch, length, kv_heads, head_dim], segment_ids and
    positions: int [batch, length], all global arrays laid out by their logical names.
    kernel: the platform's choice for whole sequences (`splash` runs inside shards where
    `shard_kernel` allows it, else the XLA blocks).
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = context_axes(q.shape[1])
    n = context_size(q.shape[1])
    q_spec = logical_to_spec(Q_NAMES, shape=q.shape, mesh=mesh)
    kv_spec = logical_to_spec(KV_NAMES, shape=k.shape, mesh=mesh)
    if kv_spec[2] != q_spec[2]:  # the tensor axis splits query heads but not the fewer K/V heads
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    token_spec = logical_to_spec(TOKEN_NAMES, shape=positions.shape, mesh=mesh)
    specs = (q_spec, kv_spec, kv_spec, token_spec, token_spec)
    args = (q, k, v, segment_ids, positions)
    kernel = shard_kernel(kernel, mode, q.shape[1], n, sliding_window)
    if kernel != "xla":
        head_axes = (q_spec[2],) if isinstance(q_spec[2], str) else tuple(q_spec[2] or ())
        local_heads = q.shape[2] // int(np.prod([mesh.shape[a] for a in head_axes], dtype=int))
        local = q.shape[1] // n
        built = splash.make_kernel(
            q.shape[1], local_heads, block=splash.block_size(local), window=sliding_window, softcap=softcap,
            interpret=kernel == "splash_interpret", q_order=zigzag(q.shape[1], n), q_shards=n,
        )  # fmt: skip
        fn = functools.partial(_allgather_splash, axes=axes, n=n, scale=scale)
        kernel_spec = built.manual_sharding_spec(jax.sharding.NamedSharding(mesh, jax.P(None, axes)))
        return jax.shard_map(fn, in_specs=(*specs, kernel_spec), out_specs=q_spec, check_vma=False)(*args, built)
    options = dict(axes=axes, sliding_window=sliding_window, scale=scale, softcap=softcap)
    if mode == "ring":
        fn = functools.partial(_ring, n=n, **options)
    else:
        fn = functools.partial(_allgather, **options)
    return jax.shard_map(fn, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


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


_ZIGZAGGED: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("zigzagged", default=None)


def _zigzagged(length: int, n: int) -> bool:
    """Whether the sequences being traced (of `length`, split over n devices) are in zig-zag order."""
    return _ZIGZAGGED.get() == (length, n)


@contextlib.contextmanager
def balanced(batch: dict):
    """The batch ([batch, length] arrays: tokens, targets, positions, segment ids, weights) in
    zig-zag order when the sequence is split over devices (and splits evenly), unchanged otherwise.
    Attention reads positions and segment ids, and the loss is a sum over tokens, so neither changes.

    While the block is open (trace the model inside it), attention knows the order: the splash
    kernel's mask is static, so it can run inside the shards only where the order is known at trace
    time (prefill, which keeps the natural order, runs the order-free XLA blocks)."""
    length = batch["tokens"].shape[1]
    n = context_size(length)
    if n == 1 or length % (2 * n):
        yield batch
        return
    order = zigzag(length, n)
    token = _ZIGZAGGED.set((length, n))
    try:
        yield {k: jnp.take(x, order, axis=1) if x.ndim >= 2 and x.shape[1] == length else x for k, x in batch.items()}
    finally:
        _ZIGZAGGED.reset(token)
