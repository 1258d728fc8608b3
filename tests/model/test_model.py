"""Numerical properties of the model, each checked against an independent computation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig, preset
from lm.errors import UserError
from lm.model import Transformer, rope, rope_frequencies
from lm.model.transformer import layer_paths


def build(cfg, seed=0):
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def tokens_and_positions(batch, length, vocab, seed=0):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(length), (batch, length))


def copy_into_unrolled(scanned: Transformer, unrolled: Transformer) -> None:
    """Give the unrolled model the scanned model's parameters (layer i = its slice of its stack)."""
    source = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
    target = nnx.state(unrolled, nnx.Param)
    where = layer_paths(scanned.cfg)
    for path, var in nnx.to_flat_state(target):
        if path[0] == "blocks":
            prefix, index = where[path[1]]
            var.set_value(source[prefix + path[2:]].get_value()[index])
        else:
            var.set_value(source[path].get_value())
    nnx.update(unrolled, target)


FAMILIES = {
    "llama": dict(),
    "gpt2": dict(
        norm="layer",
        mlp="gelu",
        positions="learned",
        qkv_bias=True,
        mlp_bias=True,
        attn_out_bias=True,
        tie_embeddings=True,
    ),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, head_dim=32),
    "mistral": dict(sliding_window=8),
    # Every Gemma 2 option at once; windows on alternating layers, shorter than the test sequences.
    "gemma2": dict(
        norm="rms_plus_one",
        mlp="geglu",
        scale_embeddings=True,
        post_norms=True,
        head_dim=24,
        query_pre_attn_scalar=20.0,
        attn_softcap=5.0,
        final_softcap=8.0,
        sliding_window=8,
        sliding_window_every=2,
        tie_embeddings=True,
    ),
    # Qwen2-MoE: top-2 of 4 experts, not renormalised, a gated shared expert (Mixtral's routing:
    # tests/model/test_moe.py and tests/hf).
    "qwen2_moe": dict(
        n_experts=4, experts_per_token=2, moe_d_ff=48, n_shared_experts=1, shared_expert_d_ff=80,
        router_norm_topk=False, qkv_bias=True,
    ),  # fmt: skip
    # Dense and expert layers in one scan: every second layer has experts (MaxText's interleaved MoE;
    # 3 layers: a (dense, experts) run, then a dense tail) ...
    "moe_every_second": dict(n_experts=4, experts_per_token=2, moe_d_ff=48, moe_layer_step=2),
    # ... and a leading dense layer (DeepSeek's first dense layers), with alternating windows as well.
    "moe_dense_first": dict(
        n_experts=4, experts_per_token=2, moe_d_ff=48, dense_layers=(0,), sliding_window=8, sliding_window_every=2
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_param_count_matches_config_formula(tiny_cfg, family):
    cfg = dataclasses.replace(tiny_cfg, **FAMILIES[family])
    model = build(cfg)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.n_params


@pytest.mark.parametrize("family", FAMILIES)
def test_causality_later_tokens_never_change_earlier_logits(tiny_cfg, family):
    cfg = dataclasses.replace(tiny_cfg, **FAMILIES[family])
    model = build(cfg)
    tokens, positions = tokens_and_positions(2, 24, cfg.vocab_size)
    t = 13
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    a, b = model(tokens, positions), model(changed, positions)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-4  # the change is visible from t on


def test_segment_ids_keep_packed_documents_apart(tiny_cfg):
    model = build(tiny_cfg)
    doc_a, _ = tokens_and_positions(1, 10, tiny_cfg.vocab_size, seed=1)
    doc_b, _ = tokens_and_positions(1, 14, tiny_cfg.vocab_size, seed=2)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.concatenate([jnp.arange(10), jnp.arange(14)])[None]
    segments = jnp.concatenate([jnp.full(10, 1), jnp.full(14, 2)])[None]
    together = model(packed, positions, segments)
    alone_a = model(doc_a, jnp.arange(10)[None])
    alone_b = model(doc_b, jnp.arange(14)[None])
    np.testing.assert_allclose(together[:, :10], alone_a, atol=1e-5)
    np.testing.assert_allclose(together[:, 10:], alone_b, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_equals_unrolled(tiny_cfg, family):
    cfg = dataclasses.replace(tiny_cfg, n_layers=3, **FAMILIES[family])
    scanned = build(cfg)
    unrolled = build(dataclasses.replace(cfg, scan_layers=False), seed=1)
    copy_into_unrolled(scanned, unrolled)
    tokens, positions = tokens_and_positions(2, 32, cfg.vocab_size)
    assert np.abs(scanned(tokens, positions) - unrolled(tokens, positions)).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_equals_no_remat(tiny_cfg, policy, scan):
    cfg = dataclasses.replace(tiny_cfg, scan_layers=scan)
    plain, remat = build(cfg), build(dataclasses.replace(cfg, remat=policy))
    nnx.update(remat, nnx.state(plain, nnx.Param))
    tokens, positions = tokens_and_positions(2, 16, cfg.vocab_size)

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(tokens, positions), axis=-1))

    la, ga = nnx.value_and_grad(loss)(plain)
    lb, gb = nnx.value_and_grad(loss)(remat)
    assert abs(float(la) - float(lb)) <= 1e-6
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # The policy really reached the scanned body: the remat jaxpr recomputes under a checkpoint.
    jaxpr = str(jax.make_jaxpr(lambda m: nnx.grad(loss)(m))(remat))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


# The mixed dense/expert stacks' cache is checked through the decode loop instead
# (tests/infer/test_decode.py::test_cached_decode_equals_recompute_with_dense_and_expert_layers): run
# eagerly here, step by step, each took 25-30 s.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("moe_every_second", "moe_dense_first")])
def test_prefill_then_cached_steps_equal_full_forward(tiny_cfg, family):
    cfg = dataclasses.replace(tiny_cfg, **FAMILIES[family])
    model = build(cfg)
    tokens, positions = tokens_and_positions(2, 40, cfg.vocab_size)
    full = model(tokens, positions)
    model.init_cache(2, 64)
    prefill = model(tokens[:, :25], positions[:, :25], mode="prefill")
    np.testing.assert_allclose(prefill, full[:, :25], atol=1e-5)
    decode = nnx.jit(lambda model, tokens, positions: model(tokens, positions, mode="decode"))  # one compile, 15 steps
    for t in range(25, 40):
        step = decode(model, tokens[:, t : t + 1], positions[:, t : t + 1])
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_rope_matches_direct_numpy_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 100, 2047]])
    inv_freq = rope_frequencies(ModelConfig(d_model=24, n_heads=3, n_kv_heads=3))  # head_dim 8, theta 10k
    got = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions), inv_freq))
    want = np.empty_like(x)
    half = 4
    for b, t, h in np.ndindex(2, 5, 3):
        for i in range(half):  # pair (i, i + half) rotated by angle pos * theta^(-i / half)
            angle = positions[b, t] * 10_000.0 ** (-i / half)
            c, s = np.cos(angle), np.sin(angle)
            x1, x2 = x[b, t, h, i], x[b, t, h, i + half]
            want[b, t, h, i], want[b, t, h, i + half] = x1 * c - x2 * s, x2 * c + x1 * s
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Relative property: q.k depends only on the distance between positions.
    q, k = rng.normal(size=(1, 1, 1, 8)).astype(np.float32), rng.normal(size=(1, 1, 1, 8)).astype(np.float32)

    def dot(pq, pk):
        return float((rope(q, jnp.array([[pq]]), inv_freq) * rope(k, jnp.array([[pk]]), inv_freq)).sum())

    assert abs(dot(5, 3) - dot(105, 103)) < 1e-4


def test_invalid_configs_are_user_errors():
    with pytest.raises(UserError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(UserError, match="d_model"):
        ModelConfig(d_model=100, n_heads=3, n_kv_heads=3)
    with pytest.raises(UserError, match="preset"):
        preset("no_such_model")


def test_presets_are_valid():
    from lm.config import PRESETS

    for name, cfg in PRESETS.items():
        assert cfg.n_params > 0, name
    assert 1.1e8 < preset("gpt2_124m").n_params < 1.3e8  # GPT-2 small is 124M


@pytest.mark.slow
def test_splash_attention_matches_xla_with_segments(tiny_cfg):
    """The TPU Pallas kernel (interpret mode off TPU) against the XLA path: forward and gradients."""
    xla = build(tiny_cfg)
    splash = build(dataclasses.replace(tiny_cfg, attention_impl="splash_interpret"))
    tokens, positions = tokens_and_positions(2, 128, tiny_cfg.vocab_size)
    segments = jnp.concatenate([jnp.ones((2, 50), jnp.int32), jnp.full((2, 78), 2, jnp.int32)], axis=1)
    forward = nnx.jit(lambda m: m(tokens, positions, segments))
    np.testing.assert_allclose(forward(splash), forward(xla), atol=1e-5)
    grad = nnx.jit(nnx.grad(lambda m: m(tokens, positions, segments).std()))
    ga, gb = grad(xla), grad(splash)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _attention_reference(q, k, v, segment_ids, window=None, softcap=None, xp=np):
    """Whole-square softmax attention, K/V repeated per query head: the definition. With xp=np it
    runs in float64 numpy; with xp=jnp it is differentiable, for checking gradients."""
    if xp is np:
        q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = xp.repeat(k, group, axis=2), xp.repeat(v, group, axis=2)
    scores = xp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * xp.tanh(scores / softcap)
    t = xp.arange(q.shape[1])
    seg = xp.asarray(segment_ids)
    mask = (t[:, None] >= t[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
    if window:
        mask &= (t[:, None] - t[None, :] < window)[None]
    scores = xp.where(mask[:, None], scores, -xp.inf)
    probs = xp.exp(scores - scores.max(-1, keepdims=True))
    return xp.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("length, window, softcap", [(256, None, None), (320, None, 30.0), (256, 48, None)])
def test_blocked_causal_attention_equals_the_whole_square(length, window, softcap):
    """Causal XLA attention skips the blocks above the diagonal (and, with a static window, before
    it); the result and its gradient equal the plain definition, with GQA and packed documents."""
    from lm.kernels.xla import causal_xla_attention, query_blocks

    assert [query_blocks(n) for n in (64, 100, 192, 256, 320, 4096)] == [1, 1, 3, 4, 5, 8]
    keys = jax.random.split(jax.random.key(length), 4)
    q = jax.random.normal(keys[0], (2, length, 4, 16))
    k, v = (jax.random.normal(key, (2, length, 2, 16)) for key in keys[1:3])
    segment_ids = jnp.asarray(np.r_[[1] * (length // 3), [2] * (length - length // 3 - 5), [0] * 5])[None].repeat(2, 0)
    options = dict(sliding_window=window, softcap=softcap)
    blocked = jax.jit(lambda q, k, v: causal_xla_attention(q, k, v, segment_ids, **options))
    got = blocked(q, k, v)
    want = _attention_reference(q, k, v, segment_ids, window, softcap)
    real = np.asarray(segment_ids)[:, :, None, None] != 0  # padding queries attend only to padding
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-6)

    weight = jax.random.normal(keys[3], q.shape) * jnp.asarray(real)

    def loss(fn, q, k, v):
        return (fn(q, k, v) * weight).sum()

    def whole(q, k, v):
        return _attention_reference(q, k, v, segment_ids, window, softcap, xp=jnp)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    for a, b in zip(grad(blocked, q, k, v), grad(whole, q, k, v)):
        np.testing.assert_allclose(a, b, atol=2e-5)
