"""The zig-zag order of context parallelism: a permutation that round-trips and evens out causal work."""

import functools

import numpy as np
import pytest

from lm.kernels.context import unzigzag, zigzag


@pytest.mark.parametrize("length, n", [(16, 2), (256, 4), (1024, 8)])
def test_zigzag_round_trips_and_balances_causal_work(length, n):
    order = zigzag(length, n)
    assert sorted(order) == list(range(length))
    x = np.random.default_rng(0).normal(size=(2, length))
    np.testing.assert_array_equal(x[:, order][:, unzigzag(length, n)], x)
    # Device i holds order[i*L/n:(i+1)*L/n]; a query at position p attends p + 1 keys.
    work = (order + 1).reshape(n, -1).sum(axis=1)
    assert len(set(work)) == 1, work
    contiguous = (np.arange(length) + 1).reshape(n, -1).sum(axis=1)
    assert contiguous.max() / contiguous.min() > 2  # what the reordering avoids


def test_zigzag_needs_two_chunks_per_device():
    with pytest.raises(ValueError, match="divisible by 2 \\* 4"):
        zigzag(12, 4)


def _dense(q, k, v, seg, pos, window, softcap):
    """Reference attention: the whole [T, T] score matrix, masked and softmaxed."""
    import jax
    import jax.numpy as jnp

    from lm.kernels.context import _mask
    from lm.kernels.xla import group_queries, ungroup_queries

    s = jnp.einsum("bkgqd,bskd->bkgqs", group_queries(q, k.shape[2]), k) * q.shape[-1] ** -0.5
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(_mask(seg, pos, seg, pos, window)[:, None, None], s, -1e30)
    return ungroup_queries(jnp.einsum("bkgqs,bskd->bkgqd", jax.nn.softmax(s, -1), v))


@pytest.mark.parametrize("window, softcap", [(None, None), (48, 5.0)])
def test_written_out_backward_pass_equals_autodiff_of_dense_attention(window, softcap):
    """The shard's forward (online softmax over KEY_BLOCK pieces) and its written-out backward pass
    (probabilities from the log-sum-exp) against jax.vjp of [T, T] attention: two documents and
    padding, GQA, 1,100 keys (three pieces, the last short), a window, Gemma's soft cap."""
    import jax
    import jax.numpy as jnp

    from lm.kernels.context import NO_WINDOW, _local_backward, _local_forward, _Plan

    batch, length, heads, kv_heads, head_dim = 2, 1100, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:3])
    d_out = jax.random.normal(keys[3], q.shape)
    seg = np.ones((batch, length), np.int32)
    seg[0, 300:], seg[1, -50:] = 2, 0
    pos = np.concatenate([np.arange(300), np.arange(length - 300)])[None].repeat(2, 0)
    pos[1] = np.arange(length)
    pos[1, -50:] = np.arange(50)
    plan = _Plan("allgather", (), 1, head_dim**-0.5, softcap)
    w = jnp.int32(NO_WINDOW if window is None else window)
    out, lse = jax.jit(_local_forward, static_argnums=0)(plan, q, k, v, seg, pos, w)
    grads = jax.jit(_local_backward, static_argnums=0)(plan, q, k, v, seg, pos, w, out, lse, d_out)
    want, vjp = jax.vjp(lambda q, k, v: _dense(q, k, v, seg, pos, w, softcap), q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-6)
    for got, expected in zip(grads, vjp(d_out)):
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_a_key_block_no_query_sees_is_skipped_and_changes_nothing():
    """Keys all after every query (or in another document) are skipped, not multiplied by zero: their
    values are NaN here, which any arithmetic on them would spread into the output and gradients."""
    import jax
    import jax.numpy as jnp

    from lm.kernels.context import LOW, NO_WINDOW, _backward, _forward, _Plan
    from lm.kernels.xla import group_queries

    plan = _Plan("allgather", (), 1, 16**-0.5, None)
    seg, pos, w = jnp.ones((2, 8), jnp.int32), jnp.broadcast_to(jnp.arange(8), (2, 8)), jnp.int32(NO_WINDOW)

    @jax.jit
    def run(q, k, v):
        qg = group_queries(q, 2)
        state = (jnp.full(qg.shape[:-1], LOW), jnp.zeros(qg.shape[:-1]), jnp.zeros(qg.shape))
        seen = _forward(plan, qg, seg, pos, w, state, (k, v, seg, pos))
        nan = jnp.full_like(v, jnp.nan)
        unseen = [(k, nan, seg, pos + 8), (k, nan, seg + 1, pos)]  # after every query; another document
        lse = seen[0] + jnp.log(seen[1])
        backward = functools.partial(_backward, plan, qg, seg, pos, w, lse, qg, lse, jnp.zeros_like(qg))
        return seen, [_forward(plan, qg, seg, pos, w, seen, block) for block in unseen], [backward(b) for b in unseen]

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 8, n, 16)) for i, n in ((0, 4), (1, 2), (2, 2)))
    seen, later, grads = run(q, k, v)
    assert all(np.isfinite(x).all() for x in seen)
    for state in later:
        for got, want in zip(state, seen):
            np.testing.assert_array_equal(got, want)
    for dq, dk, dv in grads:
        assert not np.any(dq) and not np.any(dk) and not np.any(dv)
