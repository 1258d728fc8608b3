"""Chunked prefill (model.prefill_chunk): the same logits and KV cache as one pass, cached decode after
it equal to recompute, and prefill memory that follows the chunk instead of the prompt."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.infer.decode import generate
from lm.model import Transformer

# GQA, a window (6) shorter than a chunk on alternating layers (Gemma 2's pattern: the window is a
# traced per-layer value inside the layer scan).
CFG = ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
    sliding_window=6, sliding_window_every=2,
)  # fmt: skip
LENGTHS = (23, 40, 1)


@nnx.jit(static_argnames="mode")
def _call(model, tokens, positions, segment_ids=None, *, mode):
    return model(tokens, positions, segment_ids, mode=mode)


def _prefill(model, tokens, lengths, cache_len, chunk=None):
    """Logits [batch, width, vocab] and the cache after a one-pass prefill, or one chunk at a time."""
    model.init_cache(tokens.shape[0], cache_len, jnp.float32)
    width = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(width), tokens.shape)
    if chunk is None:
        segment_ids = (positions < jnp.asarray(lengths)[:, None]).astype(jnp.int32)
        logits = _call(model, tokens, positions, segment_ids, mode="prefill")
    else:
        pieces = [
            _call(model, tokens[:, s : s + chunk], positions[:, s : s + chunk], mode="chunk")
            for s in range(0, width, chunk)
        ]
        logits = jnp.concatenate(pieces, axis=1)
    return np.asarray(logits), {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Cache))}


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_chunked_prefill_equals_one_pass_logits_and_cache(scan):
    model = Transformer(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 40)), jnp.int32)
    want_logits, want_cache = _prefill(model, tokens, LENGTHS, 48)
    got_logits, got_cache = _prefill(model, tokens, LENGTHS, 48, chunk=8)
    assert want_cache.keys() == got_cache.keys() and len(want_cache) == (2 if scan else 2 * CFG.n_layers)
    for row, n in enumerate(LENGTHS):  # padding (past a row's prompt) is never read, so not compared
        np.testing.assert_allclose(got_logits[row, :n], want_logits[row, :n], atol=2e-5, rtol=0)
        for path in want_cache:
            slot = (slice(None),) * (want_cache[path].ndim - 4)  # the layers axis when scanned
            want, got = want_cache[path][(*slot, row)], got_cache[path][(*slot, row)]
            np.testing.assert_allclose(got[..., :n, :], want[..., :n, :], atol=2e-5, rtol=0, err_msg=str(path))


def test_generate_with_chunked_prefill_equals_recompute():
    """Prompts longer than the chunk, one shorter; a chunk (12) that does not divide the prompt
    bucket (64), so the last chunk (52..63) overlaps the one before."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 256, n).tolist() for n in (30, 5, 53)]
    model = Transformer(dataclasses.replace(CFG, prefill_chunk=12), rngs=nnx.Rngs(1))
    chunked = generate(model, prompts, max_new_tokens=8).tokens
    assert chunked == generate(model, prompts, max_new_tokens=8, use_cache=False).tokens


def test_chunked_prefill_memory_follows_the_chunk():
    """XLA's temporary memory for a 512-token prefill: one pass holds scores for a block of queries
    against the whole prompt; 32-token chunks hold a chunk's."""
    from lm.infer.decode import _prefill, _prefill_chunked
    from lm.infer.sampling import Sampling

    cfg = dataclasses.replace(CFG, n_layers=1, sliding_window=None, max_seq_len=512)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.init_cache(1, 512, jnp.float32)
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    args = (params, cache, jnp.zeros((1, 512), jnp.int32), jnp.array([512]), jax.random.key(0),
            jnp.zeros((1, 256), bool))  # fmt: skip

    def temp_bytes(fn, **kw):
        return fn.lower(graphdef, *args, sampling=Sampling(), **kw).compile().memory_analysis().temp_size_in_bytes

    one, chunked = temp_bytes(_prefill), temp_bytes(_prefill_chunked, chunk=32)
    assert chunked < one / 2, (one, chunked)
