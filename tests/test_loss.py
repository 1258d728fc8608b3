"""The chunked cross-entropy equals the plain one, in value and gradient, and never builds full logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.errors import UserError
from lm.loss import chunked_cross_entropy_sum, cross_entropy_sum
from lm.model import Transformer
from lm.train.step import _loss_sums


def batch(b, t, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
    weights = (rng.random((b, t)) > 0.2).astype(np.float32)  # some masked positions, as with padding
    return {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "weights": jnp.asarray(weights),
    }


def loss_and_grads(cfg, data):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def mean_loss(p):
        total, weight = _loss_sums(nnx.merge(graphdef, p, rest), data)[:2]
        return total / weight

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    return loss, jax.tree.leaves(grads)


@pytest.mark.parametrize("softcap", [None, 2.0])  # Gemma 2's final logit soft-cap applies to every chunk
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [8, 12])  # 12 does not divide the length: padded with zero weights
def test_chunked_loss_and_gradients_equal_plain(tied, chunk, softcap):
    cfg = ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, tie_embeddings=tied,
        final_softcap=softcap,
    )  # fmt: skip
    data = batch(2, 32, cfg.vocab_size)
    plain_loss, plain_grads = loss_and_grads(dataclasses.replace(cfg, loss_chunk=0), data)
    chunk_loss, chunk_grads = loss_and_grads(dataclasses.replace(cfg, loss_chunk=chunk), data)
    np.testing.assert_allclose(chunk_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert len(chunk_grads) == len(plain_grads)
    for c, p in zip(chunk_grads, plain_grads):
        np.testing.assert_allclose(c, p, rtol=1e-5, atol=1e-6)


def test_chunked_sum_equals_plain_sum_on_random_logits():
    """The loss function alone, against logits computed in one piece with numpy's own softmax."""
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((3, 20, 16)).astype(np.float32)
    head = rng.standard_normal((16, 64)).astype(np.float32)
    targets = rng.integers(0, 64, (3, 20))
    weights = rng.random((3, 20)).astype(np.float32)
    logits = (hidden.astype(np.float64) @ head).astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = ((log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]) * weights).sum()
    got, weight = chunked_cross_entropy_sum(jnp.asarray(hidden), jnp.asarray(head), targets, weights, 7)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(weight, weights.sum(), rtol=1e-6)
    plain, _ = cross_entropy_sum(jnp.asarray(logits, jnp.float32), targets, weights)
    np.testing.assert_allclose(got, plain, rtol=1e-6)


def _buffer_shapes(hlo_text):
    return {tuple(int(d) for d in m.split(",") if d) for m in __import__("re").findall(r"f32\[([\d,]+)\]", hlo_text)}


def test_chunked_train_step_has_no_full_logits_buffer():
    # d_model 48: the head [48, 512] is smaller than the [2, 32, 512] logits the test looks for.
    cfg = ModelConfig(vocab_size=512, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128, loss_chunk=8)
    data = batch(2, 32, cfg.vocab_size)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return _loss_sums(nnx.merge(graphdef, p, rest), data)[0]

    chunked = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    shapes = _buffer_shapes(chunked)
    assert not any(s[-1] == 512 and np.prod(s) >= 2 * 32 * 512 for s in shapes), sorted(shapes)
    assert any(s[-1] == 512 and np.prod(s) == 2 * 8 * 512 for s in shapes)  # one chunk's logits
    # The same check sees the full buffer when the loss is not chunked (so it can fail).
    model = Transformer(dataclasses.replace(cfg, loss_chunk=0), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    plain = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert any(s[-1] == 512 and np.prod(s) == 2 * 32 * 512 for s in _buffer_shapes(plain))


def test_loss_chunk_is_automatic_for_large_vocabularies():
    assert ModelConfig(vocab_size=8192).loss_chunk_for(4096) == 0
    assert ModelConfig(vocab_size=32000).loss_chunk_for(4096) == 1024
    assert ModelConfig(vocab_size=128256).loss_chunk_for(8192) == 256
    assert ModelConfig(vocab_size=128256).loss_chunk_for(256) == 0  # one chunk would be the whole sequence
    assert ModelConfig(vocab_size=128256, loss_chunk=0).loss_chunk_for(8192) == 0
    assert ModelConfig(vocab_size=512, loss_chunk=64).loss_chunk_for(256) == 64
    with pytest.raises(UserError, match="loss_chunk"):
        ModelConfig(loss_chunk=-1)
