"""The decode loop: cached equals recompute, batching is invisible, sampling is seeded and correct."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.errors import UserError
from lm.infer.decode import bucket, complete, generate, window_bucket
from lm.infer.sampling import Sampling, sample
from lm.model import Transformer


@pytest.fixture(scope="module")
def model():
    from lm.config import ModelConfig

    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(4, 256, n).tolist() for n in (1, 7, 30)]


class ByteTokenizer:
    """Independent stand-in tokenizer: one token per byte, 3 is EOS."""

    eos_id = 3

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i > 3).decode(errors="replace")


def test_cached_greedy_equals_recompute_for_ragged_batch(model, prompts):
    cached = generate(model, prompts, max_new_tokens=24)
    recomputed = generate(model, prompts, max_new_tokens=24, use_cache=False)
    assert cached.tokens == recomputed.tokens
    assert all(len(t) == 24 for t in cached.tokens)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 5])
def test_windowed_decode_equals_recompute(model, prompts, chunk):
    """Attention windows of 32, 48, 64, 96 and 128 slots in turn (growing as the context fills) give
    the tokens of recomputing the whole sequence each step, with and without streaming chunks."""
    windowed = generate(model, prompts, max_new_tokens=80, min_window=16, chunk=chunk)
    assert sorted(set(windowed.windows)) == [32, 48, 64, 96, 128]  # the longest prompt is 30 tokens
    assert windowed.tokens == generate(model, prompts, max_new_tokens=80, use_cache=False).tokens


def test_prefill_computes_logits_only_at_sampled_positions(model, prompts):
    from lm.infer.decode import _prefill

    graphdef, params = nnx.split(model, nnx.Param)
    clone = nnx.merge(graphdef, params)
    clone.init_cache(3, 64, jnp.float32)
    dgraph, _, cache = nnx.split(clone, nnx.Param, nnx.Cache)
    tokens = jnp.zeros((3, 32), jnp.int32)
    seen = jnp.zeros((3, 256), bool)
    jaxpr = jax.make_jaxpr(lambda *a: _prefill(dgraph, *a, sampling=Sampling()))(
        params, cache, tokens, jnp.array([1, 7, 30]), jax.random.key(0), seen
    )
    shapes = {tuple(v.aval.shape) for e in jaxpr.eqns[0].params["jaxpr"].eqns for v in e.outvars}
    assert (3, 256) in shapes and (3, 32, 256) not in shapes


def test_batched_equals_one_prompt_at_a_time(model, prompts):
    batched = generate(model, prompts, max_new_tokens=16).tokens
    assert batched == [generate(model, [p], max_new_tokens=16).tokens[0] for p in prompts]


def test_seeded_sampling_is_reproducible(model, prompts):
    s = Sampling(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2)
    a = generate(model, prompts, max_new_tokens=16, sampling=s, seed=7).tokens
    assert a == generate(model, prompts, max_new_tokens=16, sampling=s, seed=7).tokens
    assert a == generate(model, prompts, max_new_tokens=16, sampling=s, seed=7, use_cache=False).tokens
    assert a != generate(model, prompts, max_new_tokens=16, sampling=s, seed=8).tokens


def test_top_k_1_and_tiny_top_p_equal_greedy(model, prompts):
    greedy = generate(model, prompts, max_new_tokens=12).tokens
    assert (
        generate(model, prompts, max_new_tokens=12, sampling=Sampling(temperature=1.0, top_k=1), seed=3).tokens
        == greedy
    )
    assert (
        generate(model, prompts, max_new_tokens=12, sampling=Sampling(temperature=1.0, top_p=1e-6), seed=3).tokens
        == greedy
    )
    assert (
        generate(model, prompts, max_new_tokens=12, sampling=Sampling(temperature=1.0, min_p=0.999), seed=3).tokens
        == greedy
    )


def test_sampling_filters_keep_only_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    drawn = np.asarray(sample(logits, keys, Sampling(temperature=1.0, top_k=2)))
    assert set(drawn) == {0, 1}
    drawn = np.asarray(sample(logits, keys, Sampling(temperature=1.0, top_p=0.7)))
    assert set(drawn) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    drawn = np.asarray(sample(logits, keys, Sampling(temperature=1.0, min_p=0.25)))
    assert set(drawn) == {0, 1, 2}  # p >= 0.25 * 0.5
    frac = np.mean(np.asarray(sample(logits, keys, Sampling(temperature=1.0))) == 0)
    assert abs(frac - 0.5) < 0.05


def test_eos_stops_each_row_at_its_own_step(model, prompts):
    free = generate(model, prompts, max_new_tokens=16).tokens
    eos = free[1][5]  # pretend the 6th token of row 1 is EOS
    out = generate(model, prompts, max_new_tokens=16, eos_id=eos).tokens
    for row_free, row_out in zip(free, out):  # every row ends at its own first EOS, or runs to the end
        assert row_out == (row_free[: row_free.index(eos) + 1] if eos in row_free else row_free)


def test_eos_as_the_first_token_and_a_single_new_token(model, prompts):
    free = generate(model, prompts, max_new_tokens=16).tokens
    first = generate(model, prompts, max_new_tokens=16, eos_id=free[0][0]).tokens
    assert first[0] == [free[0][0]]  # row 0 is done after prefill; the others go on
    assert generate(model, prompts, max_new_tokens=1).tokens == [row[:1] for row in free]


def test_stop_strings_cut_the_output(model):
    tok = ByteTokenizer()
    text = complete(model, tok, ["hello"], max_new_tokens=40)[0][0].completion
    assert len(text) > 10
    stop = text[6:9]
    cut = complete(model, tok, ["hello"], max_new_tokens=40, stop=[stop])[0][0].completion
    assert cut == text[: text.index(stop)]
    pieces = []
    streamed = complete(model, tok, ["hello"], max_new_tokens=40, stop=[stop], stream=pieces.append, chunk=4)
    assert "".join(pieces) == streamed[0][0].completion == cut


def test_context_overflow_and_empty_prompt_are_user_errors(model):
    with pytest.raises(UserError, match=r"prompt \(100 tokens\) \+ new tokens \(40\) = 140 exceeds .* 128"):
        generate(model, [[5] * 100], max_new_tokens=40)
    with pytest.raises(UserError, match="empty prompt"):
        generate(model, [[]], max_new_tokens=4)


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]
    assert [window_bucket(n, 64) for n in (1, 64, 65, 97, 129, 513, 769)] == [64, 64, 96, 128, 192, 768, 1024]


def test_decode_steps_update_the_cache_in_place(model, prompts, monkeypatch):
    """Cache writes happen in place: the compiled decode loop copies no layer's cache, at batch 1
    and batch 3 (each shape once went wrong its own way in XLA:CPU, docs/benchmarks.md)."""
    import re

    import lm.infer.decode as decode

    texts, compiled = [], decode._compiled_decode_chunk

    def spy(backend):
        fn = compiled(backend)

        def call(*args, **kwargs):
            texts.append(fn.lower(*args, **kwargs).compile().as_text())
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(decode, "_compiled_decode_chunk", spy)
    for rows in (prompts[2:], prompts):
        decode.generate(model, rows, max_new_tokens=8)
    kv_heads, head_dim = model.cfg.n_kv_heads, model.cfg.dim_per_head
    cache_copy = re.compile(rf"= f32\[\d+,{kv_heads},\d+,{head_dim}\]\{{[\d,]*\}} copy\(")
    assert len(texts) == 2 and all("scatter" in t or "dynamic-update-slice" in t for t in texts)
    assert not [m.group(0) for t in texts for m in cache_copy.finditer(t)]


@pytest.mark.parametrize(
    "layers",
    [
        dict(moe_layer_step=2),  # 3 layers: a (dense, experts) run, then a dense one
        dict(dense_layers=(0,), sliding_window=4, sliding_window_every=2),  # a dense first layer, windows
    ],
)
@pytest.mark.slow
def test_cached_decode_equals_recompute_with_dense_and_expert_layers(prompts, layers):
    """The cached loop's unstacked twin takes each layer from its run of the scanned stack."""
    from lm.config import ModelConfig

    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                      n_experts=4, moe_d_ff=32, **layers)  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    cached = generate(model, prompts, max_new_tokens=8)
    assert cached.tokens == generate(model, prompts, max_new_tokens=8, use_cache=False).tokens
