"""The zig-zag order of context parallelism: a permutation that round-trips and evens out causal work."""

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


def test_a_key_block_no_query_sees_is_skipped_and_changes_nothing():
    """Keys all after every query (or in another document) are skipped, not multiplied by zero: their
    values are NaN here, which any arithmetic on them would spread into the output."""
    import jax
    import jax.numpy as jnp

    from lm.kernels.context import _online_softmax

    @jax.jit
    def outputs(q, k, v):
        seg, pos = jnp.ones((2, 8), jnp.int32), jnp.broadcast_to(jnp.arange(8), (2, 8))
        state, merge, finish = _online_softmax(q, seg, pos, 2, sliding_window=None, scale=None, softcap=None)
        seen = merge(state, (k, v, seg, pos))
        nan = jnp.full_like(v, jnp.nan)
        later, other_document = merge(seen, (k, nan, seg, pos + 8)), merge(seen, (k, nan, seg + 1, pos))
        return finish(seen), finish(later), finish(other_document)

    want, *got = outputs(*(jax.random.normal(jax.random.key(i), (2, 8, n, 16)) for i, n in ((0, 4), (1, 2), (2, 2))))
    assert np.isfinite(want).all()
    for out in got:
        np.testing.assert_array_equal(out, want)
