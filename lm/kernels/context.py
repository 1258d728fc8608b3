"""Causal self-attention with the sequence split over the mesh axes of the `length` rule
(`mesh.context`: context parallelism), and the zig-zag order that balances its causal work.

Each device holds a slice of the queries, keys and values. In the XLA kernel, which key a query may
see is decided by positions and segment ids, never by where a token sits in the array: within a
document positions rise by one per token (lm.data packs documents that way), so `key position <=
query position` in the same document is exactly the causal mask, in any order of the tokens. That is
what lets the sequence be reordered (`zigzag`) without changing a number. The splash paths decide by
place, so they read the order `balanced` declares at trace time.

Two modes (model.context_parallel):
  allgather  K/V (with their positions and segment ids) gathered whole on every device; each device
             attends its queries to all of them. One all-gather per layer forward, and in the
             backward pass another and a reduce-scatter of dk, dv; K/V of the whole sequence in memory.
  ring       K/V blocks passed around the devices with `ppermute`, the next block in flight while
             the current one is attended. Memory holds two K/V blocks at a time.
Inside each shard, allgather runs the splash kernel where the platform's kernel is splash: its
mask is static, built for the queries in zig-zag order where `balanced` reordered the batch
(training, eval, scoring) and in natural order otherwise (prefill). A ring runs splash per pair of
(local query chunk, arriving key chunk): causal on the diagonal, mask-free for keys all before the
queries, merged by log-sum-exp (`_ring_splash_forward`). Otherwise (a traced window, a window in a
ring, another platform) both modes merge keys KEY_BLOCK
at a time with an online softmax (running max, sum and output), so the scores in memory are [local
queries, KEY_BLOCK] per head, never [T, T]. The backward pass is written out, flash attention's: it
recomputes each block's probabilities from the output's log-sum-exp, so all that is kept for it is
the shard's own q, k, v, output and log-sum-exp. In a ring the K/V blocks travel the ring again with
their dk, dv, so the backward pass too holds two blocks at a time. A key block that no local query
may see (causally after all of them, or outside every window) is skipped by `lax.cond`, forward and
backward: under zig-zag order about half the blocks of a causal sequence are, and the result is the
same to the bit, since such a block changes neither the running state nor a gradient.
"""

import contextlib
import contextvars
import dataclasses
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


NO_WINDOW = np.iinfo(np.int32).max  # a window no sequence reaches: plain causal attention
LOW = float(jnp.finfo(jnp.float32).min)
KEY_BLOCK = 512  # keys per score block: a device holds [its queries, KEY_BLOCK] scores per head at a time


def _mask(seg_q, pos_q, seg_k, pos_k, window):
    """bool [batch, q, k]: same document, key not after the query and within the window."""
    pq, pk = pos_q[:, :, None], pos_k[:, None, :]
    return (seg_q[:, :, None] == seg_k[:, None, :]) & (pk <= pq) & (pq - pk < window)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a shard's attention needs to know besides its arrays (static: it shapes the program)."""

    mode: str  # allgather or ring
    axes: tuple[str, ...]  # the mesh axes that split the sequence
    n: int  # how many devices share a sequence
    scale: float
    softcap: float | None
    kernel: str = "xla"  # in a ring: xla (key blocks) or splash / splash_interpret (per chunk pair)
    zigzag: bool = False  # whether each device holds two zig-zag chunks (else one, in natural order)


def _key_pieces(block):
    """A K/V block (k, v [batch, keys, kv_heads, head_dim], segment ids and positions [batch, keys])
    cut into pieces of at most KEY_BLOCK keys, stacked on a leading axis for lax.scan."""
    keys = block[0].shape[1]
    n = -(-keys // KEY_BLOCK)
    while keys % n:
        n += 1
    return [jnp.moveaxis(x.reshape(x.shape[0], n, keys // n, *x.shape[2:]), 1, 0) for x in block]


def _whole(pieces):
    """_key_pieces' inverse for one stacked array [pieces, batch, keys/pieces, ...]."""
    x = jnp.moveaxis(pieces, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _scores(plan, qg, kb):
    """Scaled (and soft-capped) scores [batch, kv_heads, group, queries, keys], and tanh of the cap
    (its derivative is 1 - tanh^2), or None without one."""
    s = jnp.einsum("bkgqd,bskd->bkgqs", qg, kb) * plan.scale
    if plan.softcap is None:
        return s, None
    t = jnp.tanh(s / plan.softcap)
    return plan.softcap * t, t


def _forward(plan, qg, seg, pos, window, state, block):
    """The online softmax's running (max, sum, output) per query after the keys of `block`,
    KEY_BLOCK at a time. A piece no local query may see (all of it after them, another document,
    outside the window) would leave the state as it is: skipped, it costs the mask, no matmul.

    The step is a jax.checkpoint although nothing differentiates it (the backward pass is
    `_backward`): without it, under the model's scan over layers, jax's partial evaluation kept
    every piece's mask and scores at once ([pieces, queries, KEY_BLOCK] per head: 3.4 GiB instead
    of 0.6 for the `small` train step at 8k tokens, context 2)."""

    def attend(state, piece, mask):
        m, total, acc = state
        s, _ = _scores(plan, qg, piece[0].astype(jnp.float32))
        s = jnp.where(mask, s, LOW)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p, piece[1].astype(jnp.float32))
        return m_new, total * correction + p.sum(-1), acc

    @jax.checkpoint
    def step(state, piece):
        mask = _mask(seg, pos, piece[2], piece[3], window)[:, None, None]
        return jax.lax.cond(mask.any(), attend, lambda state, *_: state, state, piece, mask), None

    return jax.lax.scan(step, state, _key_pieces(block))[0]


def _backward(plan, qg, seg, pos, window, lse, dog, delta, dqg, block):
    """Flash attention's backward pass over one K/V block, KEY_BLOCK keys at a time: the
    probabilities come back from the saved log-sum-exp, so nothing of the forward's scores was kept.
    Returns dq (accumulated into dqg) and this block's dk, dv (float32)."""

    def grads(dqg, piece, mask):
        kb, vb = piece[0].astype(jnp.float32), piece[1].astype(jnp.float32)
        s, t = _scores(plan, qg, kb)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        ds = p * (jnp.einsum("bkgqd,bskd->bkgqs", dog, vb) - delta[..., None])
        if t is not None:
            ds = ds * (1 - t * t)
        ds = ds * plan.scale
        dk = jnp.einsum("bkgqs,bkgqd->bskd", ds, qg)
        dv = jnp.einsum("bkgqs,bkgqd->bskd", p, dog)
        return dqg + jnp.einsum("bkgqs,bskd->bkgqd", ds, kb), (dk, dv)

    def skip(dqg, piece, mask):
        return dqg, (jnp.zeros(piece[0].shape, jnp.float32), jnp.zeros(piece[1].shape, jnp.float32))

    def step(dqg, piece):
        mask = _mask(seg, pos, piece[2], piece[3], window)[:, None, None]
        return jax.lax.cond(mask.any(), grads, skip, dqg, piece, mask)

    dqg, (dk, dv) = jax.lax.scan(step, dqg, _key_pieces(block))
    return dqg, _whole(dk), _whole(dv)


def _gather(plan, block):
    """The whole sequence's K/V (and segment ids, positions) on every device."""
    if plan.n == 1:
        return block
    return tuple(jax.lax.all_gather(x, plan.axes, axis=1, tiled=True) for x in block)


def _pass_on(plan, x):
    """Each device's x to the next device of the ring."""
    return jax.lax.ppermute(x, plan.axes, [(i, (i + 1) % plan.n) for i in range(plan.n)])


def _local_forward(plan, q, k, v, seg, pos, window):
    """One device's attention (inside shard_map): its queries q [batch, length/n, heads, head_dim]
    against every device's K/V, by `plan.mode`. Returns the output and the log-sum-exp of each
    query's scores [batch, length/n, heads], which is all the backward pass needs besides q, k, v."""
    if plan.kernel != "xla":
        return _ring_splash_forward(plan, q, k, v, seg)
    qg = group_queries(q, k.shape[2]).astype(jnp.float32)  # [batch, kv_heads, group, length, head_dim]
    state = (jnp.full(qg.shape[:-1], LOW), jnp.zeros(qg.shape[:-1]), jnp.zeros(qg.shape))
    attend = functools.partial(_forward, plan, qg, seg, pos, window)
    if plan.mode == "ring" and plan.n > 1:

        def step(carry, _):
            state, block = carry
            incoming = _pass_on(plan, block)  # sent before this block is attended: the transfer overlaps the work
            return (attend(state, block), incoming), None

        (state, last), _ = jax.lax.scan(step, (state, (k, v, seg, pos)), None, length=plan.n - 1)
        state = attend(state, last)
    else:
        state = attend(state, _gather(plan, (k, v, seg, pos)))
    m, total, acc = state  # every query sees itself, so total > 0
    lse = jnp.moveaxis(m + jnp.log(total), 3, 1)  # [batch, length, kv_heads, group]
    return ungroup_queries((acc / total[..., None]).astype(q.dtype)), lse.reshape(*lse.shape[:2], -1)


def _local_backward(plan, q, k, v, seg, pos, window, out, lse, d_out):
    """dq, dk, dv of one device's attention (inside shard_map). In a ring each K/V block travels
    the ring again with its dk, dv, which every device adds its share to; after n steps they are
    back on the block's own device. allgather gathers K/V again and reduce-scatters dk, dv."""
    if plan.kernel != "xla":
        return _ring_splash_backward(plan, q, k, v, seg, out, lse, d_out)
    kv_heads = k.shape[2]
    qg = group_queries(q, kv_heads).astype(jnp.float32)
    dog = group_queries(d_out, kv_heads).astype(jnp.float32)
    delta = jnp.sum(dog * group_queries(out, kv_heads).astype(jnp.float32), -1)
    lse = jnp.moveaxis(lse.reshape(*lse.shape[:2], kv_heads, -1), 1, 3)
    grads = functools.partial(_backward, plan, qg, seg, pos, window, lse, dog, delta)
    dqg = jnp.zeros(qg.shape)
    if plan.mode == "ring" and plan.n > 1:

        def step(carry, _):
            dqg, block, dk, dv = carry
            incoming = _pass_on(plan, block)
            dqg, dk_block, dv_block = grads(dqg, block)
            return (dqg, incoming, *_pass_on(plan, (dk + dk_block, dv + dv_block))), None

        zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        (dqg, last, dk, dv), _ = jax.lax.scan(step, (dqg, (k, v, seg, pos), *zeros), None, length=plan.n - 1)
        dqg, dk_block, dv_block = grads(dqg, last)
        dk, dv = _pass_on(plan, (dk + dk_block, dv + dv_block))
    else:
        dqg, dk, dv = grads(dqg, _gather(plan, (k, v, seg, pos)))
        if plan.n > 1:  # each device keeps the sum over devices of its own keys' gradients
            dk, dv = (jax.lax.psum_scatter(x, plan.axes, scatter_dimension=1, tiled=True) for x in (dk, dv))
    return ungroup_queries(dqg).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _chunk_ids(plan, device):
    """The sequence chunks a device holds, in its local order: under zig-zag chunks i and 2n-1-i of
    2n, else chunk i of n."""
    return (device, 2 * plan.n - 1 - device) if plan.zigzag else (device,)


def _split(x, count, axis):
    return jnp.split(x, count, axis=axis)


def _relation(query_chunk, key_chunk):
    """0: no query sees a key (keys after); 1: the diagonal (causal); 2: keys all before (full)."""
    return jnp.where(key_chunk < query_chunk, 2, jnp.where(key_chunk == query_chunk, 1, 0))


def _pair_kernels(plan, chunk, heads):
    """The two splash kernels a ring's chunk pairs need: the diagonal (causal) and keys before (full)."""
    block = splash.block_size(chunk)
    return [
        splash.make_kernel(chunk, heads, block=block, window=None, softcap=plan.softcap,
                           interpret=plan.kernel == "splash_interpret", full=full, save_residuals=True)
        for full in (False, True)
    ]  # fmt: skip


def _ring_splash_forward(plan, q, k, v, seg):
    """A ring whose every step runs splash per pair of (local query chunk, arriving key chunk):
    lax.switch picks the causal kernel on the diagonal, the mask-free one for keys all before the
    queries, nothing for keys after them; documents by segment ids. The pairs' outputs merge by
    their log-sum-exp. Returns what `_local_forward` does."""
    count = 2 if plan.zigzag else 1
    causal, full = _pair_kernels(plan, q.shape[1] // count, q.shape[2])
    device = jax.lax.axis_index(plan.axes)
    heads_major = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    queries = _split(heads_major(q * plan.scale), count, 2)  # the kernel does not scale
    q_segments = _split(seg, count, 1)

    def skip(q, k, v, q_segments, kv_segments):
        return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], LOW)

    branches = [skip] + [
        lambda *a, kernel=kernel: jax.tree.map(lambda x: x.astype(jnp.float32), splash.pair_forward(kernel, *a))
        for kernel in (causal, full)
    ]

    def attend(state, block, source):
        keys, values, k_segments = (_split(x, count, axis) for x, axis in zip(block, (2, 2, 1)))
        merged = []
        for x, (lse, acc) in enumerate(state):
            for y in range(count):
                relation = _relation(_chunk_ids(plan, device)[x], _chunk_ids(plan, source)[y])
                out, pair_lse = jax.lax.switch(relation, branches, queries[x], keys[y], values[y], q_segments[x],
                                               k_segments[y])  # fmt: skip
                new = jnp.logaddexp(lse, pair_lse)
                acc = acc * jnp.exp(lse - new)[..., None] + out * jnp.exp(pair_lse - new)[..., None]
                lse = new
            merged.append((lse, acc))
        return merged

    state = [(jnp.full(x.shape[:3], LOW), jnp.zeros(x.shape, jnp.float32)) for x in queries]
    block = (heads_major(k), heads_major(v), seg)

    def step(carry, offset):
        state, block = carry
        incoming = _pass_on(plan, block)
        return (attend(state, block, (device - offset) % plan.n), incoming), None

    (state, last), _ = jax.lax.scan(step, (state, block), jnp.arange(plan.n - 1))
    state = attend(state, last, (device + 1) % plan.n)
    out = heads_major(jnp.concatenate([acc for _, acc in state], axis=2)).astype(q.dtype)
    return out, heads_major(jnp.concatenate([lse for lse, _ in state], axis=2))


def _ring_splash_backward(plan, q, k, v, seg, out, lse, d_out):
    """`_ring_splash_forward`'s backward pass: splash's backward per chunk pair, handed the merged
    output and log-sum-exp, with dk, dv travelling the ring with their K/V as in the XLA blocks.
    Splash writes each pair's gradients in the input dtype, so in bfloat16 each of the up to 2n pair
    contributions is rounded once before the float32 sum (one splash call rounds once in all)."""
    count = 2 if plan.zigzag else 1
    causal, full = _pair_kernels(plan, q.shape[1] // count, q.shape[2])
    device = jax.lax.axis_index(plan.axes)
    heads_major = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    queries = _split(heads_major(q * plan.scale), count, 2)
    q_segments = _split(seg, count, 1)
    outs, d_outs = (_split(heads_major(x), count, 2) for x in (out, d_out))
    lses = _split(heads_major(lse), count, 2)

    def zero(q, k, v, *_):
        return tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))

    branches = [zero] + [
        lambda *a, kernel=kernel: tuple(x.astype(jnp.float32) for x in splash.pair_backward(kernel, *a))
        for kernel in (causal, full)
    ]

    def grads(d_queries, block, source):
        keys, values, k_segments = (_split(x, count, axis) for x, axis in zip(block, (2, 2, 1)))
        d_keys = [jnp.zeros(x.shape, jnp.float32) for x in keys]
        d_values = [jnp.zeros(x.shape, jnp.float32) for x in values]
        d_queries = list(d_queries)
        for x in range(count):
            for y in range(count):
                relation = _relation(_chunk_ids(plan, device)[x], _chunk_ids(plan, source)[y])
                dq, dk, dv = jax.lax.switch(
                    relation, branches, queries[x], keys[y], values[y], q_segments[x], k_segments[y], outs[x],
                    lses[x], d_outs[x],
                )  # fmt: skip
                d_queries[x], d_keys[y], d_values[y] = d_queries[x] + dq, d_keys[y] + dk, d_values[y] + dv
        return d_queries, jnp.concatenate(d_keys, axis=2), jnp.concatenate(d_values, axis=2)

    d_queries = [jnp.zeros(x.shape, jnp.float32) for x in queries]
    block = (heads_major(k), heads_major(v), seg)

    def step(carry, offset):
        d_queries, block, dk, dv = carry
        incoming = _pass_on(plan, block)
        d_queries, dk_block, dv_block = grads(d_queries, block, (device - offset) % plan.n)
        return (d_queries, incoming, *_pass_on(plan, (dk + dk_block, dv + dv_block))), None

    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in block[:2])
    (d_queries, last, dk, dv), _ = jax.lax.scan(step, (d_queries, block, *zeros), jnp.arange(plan.n - 1))
    d_queries, dk_block, dv_block = grads(d_queries, last, (device + 1) % plan.n)
    dk, dv = _pass_on(plan, (dk + dk_block, dv + dv_block))
    dq = heads_major(jnp.concatenate(d_queries, axis=2)) * plan.scale
    return dq.astype(q.dtype), heads_major(dk).astype(k.dtype), heads_major(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sharded_attention(plan, specs, q, k, v, seg, pos, window):
    """Context-parallel attention with its backward pass written out (flash attention's, from the
    output and log-sum-exp): what is kept for it is each device's own q, k, v, output and
    log-sum-exp, no score, no running state per key block and, in a ring, no other device's K/V.
    specs: the PartitionSpecs of (q, k/v, segment ids and positions)."""
    return _sharded_forward(plan, specs, q, k, v, seg, pos, window)[0]


def _sharded_forward(plan, specs, q, k, v, seg, pos, window):
    q_spec, kv_spec, token_spec = specs
    out, lse = jax.shard_map(
        functools.partial(_local_forward, plan), in_specs=(q_spec, kv_spec, kv_spec, token_spec, token_spec, jax.P()),
        out_specs=(q_spec, jax.P(*q_spec[:3])), check_vma=False,
    )(q, k, v, seg, pos, window)  # fmt: skip
    return out, (q, k, v, seg, pos, window, out, lse)


def _sharded_backward(plan, specs, residuals, d_out):
    q_spec, kv_spec, token_spec = specs
    dq, dk, dv = jax.shard_map(
        functools.partial(_local_backward, plan),
        in_specs=(q_spec, kv_spec, kv_spec, token_spec, token_spec, jax.P(), q_spec, jax.P(*q_spec[:3]), q_spec),
        out_specs=(q_spec, kv_spec, kv_spec), check_vma=False,
    )(*residuals, d_out)  # fmt: skip
    return dq, dk, dv, None, None, None


_sharded_attention.defvjp(_sharded_forward, _sharded_backward)


def _allgather_splash(q, k, v, seg, pos, kernel, *, axes, n, scale, zigzagged: bool):
    """allgather with the splash kernel inside the shard: the local queries (in zig-zag order or in
    natural order, as the kernel's mask was built) against the gathered K/V in natural order. As
    splash without context parallelism, causality is by place in the (natural) sequence and documents
    by segment ids, so `pos` is not read: within a document positions rise by one per token."""

    def gather(x):
        x = jax.lax.all_gather(x, axes, axis=1, tiled=True)
        if not zigzagged:
            return x
        chunks = x.reshape(x.shape[0], 2 * n, x.shape[1] // (2 * n), *x.shape[2:])  # zigzag(2n, n) of 2n chunks
        return chunks[:, unzigzag(2 * n, n)].reshape(x.shape)

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads_major = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    q, k, v = heads_major(q * scale), heads_major(gather(k)), heads_major(gather(v))  # the kernel does not scale
    return heads_major(splash.apply(kernel, q, k, v, seg, gather(seg)))


def shard_kernel(kernel: str, mode: str, length: int, n: int, sliding_window=None) -> str:
    """The kernel inside each shard for a sequence of `length` split over n devices: `splash` (or
    `splash_interpret`) where the platform's choice is splash, the window is static and the blocks
    fill whole 128-row tiles (allgather: each shard's queries; ring: each of the 2n chunks, and no
    window, which would cut a chunk pair by distance); `xla` (the online softmax over key blocks)
    otherwise."""
    if not kernel.startswith("splash") or not isinstance(sliding_window, int | None):
        return "xla"
    if mode == "allgather":
        return kernel if (length // n) % splash.LANES == 0 else "xla"
    fits = sliding_window is None and length % (2 * n) == 0 and (length // (2 * n)) % splash.LANES == 0
    return kernel if fits else "xla"


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
    if kernel != "xla" and mode == "allgather":
        head_axes = (q_spec[2],) if isinstance(q_spec[2], str) else tuple(q_spec[2] or ())
        local_heads = q.shape[2] // int(np.prod([mesh.shape[a] for a in head_axes], dtype=int))
        local = q.shape[1] // n
        zigzagged = _zigzagged(q.shape[1], n)  # the kernel's mask is static: the order is known at trace time
        built = splash.make_kernel(
            q.shape[1], local_heads, block=splash.block_size(local), window=sliding_window, softcap=softcap,
            interpret=kernel == "splash_interpret", q_order=zigzag(q.shape[1], n) if zigzagged else None, q_shards=n,
        )  # fmt: skip
        fn = functools.partial(_allgather_splash, axes=axes, n=n, scale=scale, zigzagged=zigzagged)
        kernel_spec = built.manual_sharding_spec(jax.sharding.NamedSharding(mesh, jax.P(None, axes)))
        return jax.shard_map(fn, in_specs=(*specs, kernel_spec), out_specs=q_spec, check_vma=False)(*args, built)
    zigzagged = _zigzagged(q.shape[1], n)
    plan = _Plan(mode, axes, n, q.shape[-1] ** -0.5 if scale is None else scale, softcap, kernel, zigzagged)
    window = jnp.asarray(NO_WINDOW if sliding_window is None else sliding_window, jnp.int32)
    return _sharded_attention(plan, (q_spec, kv_spec, token_spec), *args, window)


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
    kernel's mask is static, so it is built at trace time for the order the queries are in."""
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
