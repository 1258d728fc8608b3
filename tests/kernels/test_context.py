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
