"""On 8 fake CPU devices: mesh.context splits each sequence over devices and changes no number.

Losses and gradients (an SGD step of rate 1 makes the new parameters the gradients) equal a single
device's, for allgather and ring, alone and beside fsdp/tensor, with packed documents, padding, GQA
and sliding windows on alternating layers (Gemma 2's pattern: the window is traced inside the scan).
"""

import dataclasses
import functools
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from lm.config import MeshConfig, ModelConfig
from lm.kernels import attention
from lm.kernels.context import context_size, zigzag
from lm.loss import cross_entropy_sum
from lm.model import Transformer
from lm.train.step import train_step
from sharding.mesh import Layout
from sharding.partition import create_sharded, put_batch
from sharding.rules import logical_to_spec

CFG = ModelConfig(
    vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=1024,
    sliding_window=48, sliding_window_every=2,
)  # fmt: skip
# (data, fsdp, context, tensor), mode, length
CASES = [
    ((1, 1, 8, 1), "allgather", 256),
    ((1, 2, 4, 1), "ring", 256),
    ((1, 2, 2, 2), "allgather", 1024),
    ((1, 1, 2, 4), "ring", 1024),  # tensor 4 > kv_heads 2 (kept whole): K/V repeated to the query heads
]


def packed_batch(length: int, batch: int = 4, seed: int = 0) -> dict:
    """Rows of several documents (positions restart at each), the last row ending in padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (batch, length + 1)).astype(np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), 3, replace=False))
        end = length - 37 if row == batch - 1 else length
        for doc, (a, b) in enumerate(zip([0, *cuts], [*cuts, end])):
            segment_ids[row, a:b] = doc + 1
            positions[row, a:b] = np.arange(b - a)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": positions,
        "segment_ids": segment_ids,
        "weights": (segment_ids > 0).astype(np.float32),
    }


def step(shape, mode, length, devices=None, cfg=CFG):
    """(loss, parameters after one SGD step of rate 1) on the mesh `shape`."""
    data, fsdp, context, tensor = shape
    cfg = dataclasses.replace(cfg, context_parallel=mode)
    rules = (("kv_heads", None),) if tensor > CFG.n_kv_heads else ()
    layout = Layout.build(MeshConfig(data=data, fsdp=fsdp, context=context, tensor=tensor, rules=rules), devices)

    def make():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)

    with layout:
        model, opt = create_sharded(make, layout)
        loss = float(train_step(model, opt, put_batch(packed_batch(length), layout))["loss"])
    return loss, {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def single_device():
    cache = {}

    def get(length):
        if length not in cache:
            cache[length] = step((1, 1, 1, 1), "allgather", length, jax.devices()[:1])
        return cache[length]

    return get


@pytest.mark.parametrize("shape, mode, length", CASES, ids=[f"{m}-{'x'.join(map(str, s))}-{n}" for s, m, n in CASES])
def test_context_parallel_equals_single_device(shape, mode, length, single_device):
    want_loss, want_params = single_device(length)
    loss, params = step(shape, mode, length)
    assert abs(loss - want_loss) < 1e-5, (loss, want_loss)
    for path in want_params:
        np.testing.assert_allclose(params[path], want_params[path], atol=1e-5, rtol=0, err_msg=str(path))


@pytest.mark.slow
def test_splash_inside_the_shards_equals_one_device(monkeypatch):
    """attention_impl=splash_interpret (the TPU kernel in the Pallas interpreter) under mesh.context=2
    beside fsdp 2 and tensor 2, at length 512: each shard runs splash over the gathered K/V, its mask
    in the zig-zag order the train step gave the batch, on a causal layer and a windowed one (layers
    unscanned, so each window is static), with packed documents, padding and GQA. Loss and SGD step
    equal one device's XLA attention (1e-5), and so do they with ring, where splash runs per chunk
    pair on the causal layer. Outside `balanced` (prefill's natural order) splash runs with its mask
    built for natural order and gives one device's output (1e-5); for a traced window, the XLA blocks
    run."""
    from lm.kernels import context, splash

    cfg = dataclasses.replace(CFG, attention_impl="splash_interpret", scan_layers=False)
    built = []
    real = splash.make_kernel
    monkeypatch.setattr(splash, "make_kernel", lambda *a, **k: built.append(k) or real(*a, **k))
    want_loss, want_params = step(
        (1, 1, 1, 1), "allgather", 512, jax.devices()[:1], dataclasses.replace(cfg, attention_impl="xla")
    )
    loss, params = step((1, 2, 2, 2), "allgather", 512, cfg=cfg)
    assert {(k["window"], k["q_shards"]) for k in built} == {(None, 2), (CFG.sliding_window, 2)}, built
    assert abs(loss - want_loss) < 1e-5, (loss, want_loss)
    for path in want_params:
        np.testing.assert_allclose(params[path], want_params[path], atol=1e-5, rtol=0, err_msg=str(path))

    # ring: splash per chunk pair on the causal layer (a causal and a mask-free kernel of 128 rows,
    # with their log-sum-exp), the XLA blocks on the windowed one
    built.clear()
    loss, params = step((1, 2, 2, 2), "ring", 512, cfg=cfg)
    assert {(k["full"], k["save_residuals"]) for k in built} == {(False, True), (True, True)}, built
    assert abs(loss - want_loss) < 1e-5, (loss, want_loss)
    for path in want_params:
        np.testing.assert_allclose(params[path], want_params[path], atol=1e-5, rtol=0, err_msg=str(path))
    _ring_splash_at_context_4_equals_one_device()

    built.clear()
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 256, 4, 16))
    k, v = (jax.random.normal(key, (2, 256, 2, 16)) for key in keys[1:])
    segment_ids = np.ones((2, 256), np.int32)
    segment_ids[1, 200:] = 0  # a prefill row: one prompt, right-padded
    positions = np.broadcast_to(np.arange(256), (2, 256)) * (segment_ids > 0)
    want = attention(q, k, v, segment_ids, impl="xla")  # no mesh: one device's
    layout = Layout.build(MeshConfig(data=1, fsdp=2, context=2, tensor=2))
    with layout:
        assert context.shard_kernel("splash", "allgather", 512, 2) == "splash"
        assert context.shard_kernel("splash", "ring", 512, 2) == "splash"
        assert context.shard_kernel("splash", "ring", 512, 2, 48) == "xla"  # a window would cut a full pair
        assert context.shard_kernel("splash", "ring", 256, 2) == "xla"  # chunks of 64 rows
        assert context.shard_kernel("splash", "allgather", 512, 2, jax.numpy.int32(48)) == "xla"
        names = (context.Q_NAMES, context.KV_NAMES, context.KV_NAMES, context.TOKEN_NAMES, context.TOKEN_NAMES)
        args = [
            jax.device_put(x, jax.NamedSharding(layout.mesh, logical_to_spec(n, shape=x.shape, mesh=layout.mesh)))
            for x, n in zip((q, k, v, segment_ids, positions), names)
        ]
        got = jax.jit(functools.partial(context.context_attention, kernel="splash_interpret"))(*args)
    assert [k["q_order"] for k in built] == [None], built  # natural order: no zig-zag
    real = segment_ids[:, :, None, None] > 0
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5)


def _ring_splash_at_context_4_equals_one_device():
    """Attention alone, ring through splash_interpret on context 4 x tensor 2 at length 1024 (chunks
    of 128): at n=2 the ring is symmetric (device d + 1 is d - 1), so a block sent the wrong way
    round would pass there; here it would not. Output and gradients against one device."""
    from lm.kernels import context

    length, order = 1024, zigzag(1024, 4)
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (2, length, 4, 16))
    k, v = (jax.random.normal(key, (2, length, 2, 16)) for key in keys[1:3])
    batch = packed_batch(length, batch=2, seed=3)
    segment_ids, positions = batch["segment_ids"], batch["positions"]
    weight = jax.random.normal(keys[3], q.shape) * (segment_ids > 0)[:, :, None, None]

    def one_device(q, k, v):
        return (attention(q, k, v, segment_ids, impl="xla") * weight).sum()

    want = jax.grad(one_device, argnums=(0, 1, 2))(q, k, v)
    layout = Layout.build(MeshConfig(data=1, fsdp=1, context=4, tensor=2))
    with layout:
        names = (context.Q_NAMES, context.KV_NAMES, context.KV_NAMES, context.TOKEN_NAMES, context.TOKEN_NAMES)
        shard = [jax.NamedSharding(layout.mesh, logical_to_spec(n)) for n in names]
        args = [jax.device_put(np.asarray(x)[:, order], s) for x, s in zip((q, k, v, segment_ids, positions), shard)]

        def ring(q, k, v, segment_ids, positions):
            with context.balanced({"tokens": segment_ids}):  # the trace knows the zig-zag order
                out = context.context_attention(q, k, v, segment_ids, positions, mode="ring", kernel="splash_interpret")
            return (out * np.asarray(weight)[:, order]).sum()

        got = jax.jit(jax.grad(ring, argnums=(0, 1, 2)))(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a)[:, np.argsort(order)], b, atol=2e-5)


def test_context_attention_is_used_and_reordering_keeps_the_loss():
    """Under mesh.context=4 the sequence is split (so the context kernel runs); the model's loss on
    the zig-zag-reordered batch (positions and segment ids moved with the tokens) equals the loss on
    the batch as it is."""
    layout = Layout.build(MeshConfig(data=1, fsdp=2, context=4, tensor=1))
    with layout:
        model = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), layout)
        assert context_size(256) == 4
        batch = put_batch(packed_batch(256), layout)
        order = zigzag(256, 4)
        reordered = {k: v[:, order] for k, v in batch.items()}

        @nnx.jit
        def loss(model, b):
            logits = model(b["tokens"], b["positions"], b["segment_ids"])
            return cross_entropy_sum(logits, b["targets"], b["weights"])[0]

        plain, balanced = float(loss(model, batch)), float(loss(model, reordered))
    assert abs(plain - balanced) < 1e-4 * abs(plain), (plain, balanced)


@pytest.mark.parametrize(
    "platform, mode, impl",
    [("tpu", "ring", "xla"), ("cuda", "allgather", "xla"), ("tpu", "allgather", "splash"), ("tpu", "ring", "splash")],
)
def test_context_parallel_lowers_with_its_collective_and_no_square_operand(platform, mode, impl):
    """The train step lowered for a TPU or a GPU under mesh.context=4 (beside tensor=2) at length
    1024: the mode's collective is there (fsdp is 1, so no other all-gather is in the lowered
    program), and no [T, T] array is (allgather's scores are [T/4, T] per device, ring's [T/4, T/4]).
    With splash on a TPU, allgather runs the splash kernel (tpu_custom_call) inside each shard, on a
    causal and a windowed layer, and ring runs it per chunk pair on the causal layer (forward and
    backward kernels, picked per pair by stablehlo.case); else the XLA blocks, which skip unseen key
    blocks (stablehlo.case)."""
    cfg = dataclasses.replace(CFG, context_parallel=mode, dtype="bfloat16", attention_impl=impl)
    if impl == "splash":
        cfg = dataclasses.replace(cfg, scan_layers=False)  # static windows
    layout = Layout.build(MeshConfig(data=1, fsdp=1, context=4, tensor=2))

    def make():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)

    with layout:
        model, opt = create_sharded(make, layout)
        batch = put_batch(packed_batch(1024, batch=2), layout)
        text = train_step.trace(model, opt, batch).lower(lowering_platforms=(platform,)).as_text()
    collective = "stablehlo.all_gather" if mode == "allgather" else "stablehlo.collective_permute"
    assert collective in text, mode
    if impl == "splash" and mode == "ring":
        assert text.count("tpu_custom_call") >= 4, text.count("tpu_custom_call")  # causal, full; forward, backward
    elif impl == "splash":
        assert text.count("tpu_custom_call") >= 2 and "stablehlo.case" not in text
    else:
        assert "stablehlo.case" in text, mode  # key blocks no query of the shard sees are skipped
    assert "1024x1024x" not in text and "x1024x1024" not in text, mode


def test_score_with_context_equals_one_device_and_transformers(tmp_path, monkeypatch, capsys):
    """launch.score --context N on a YaRN Qwen2 import (factor 4 over 8 positions, config.json saying 8
    as Qwen2.5's does), scored past its original context (32 positions): with the sequence split over
    4 devices, or 2 beside --tensor 2, the mean NLL is one device's and transformers' (1e-5), and
    the context kernel ran. A --context that does not divide the window, or needs more devices than
    there are, is one line naming --context and exit 2."""
    import torch
    from hf_models import build_hf, sample_tokens

    from launch import score
    from lm.kernels import context

    reference = build_hf("qwen2_yarn")
    # As Qwen2.5's long-context setting: config.json keeps the original context, rope_scaling stretches it.
    reference.config.max_position_embeddings = 8
    reference.save_pretrained(tmp_path / "hf")
    ids = sample_tokens(batch=3, length=32)
    np.save(tmp_path / "ids.npy", ids)
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.as_tensor(ids, dtype=torch.long)).logits.double(), -1).numpy()
    want = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1).mean()

    calls = []
    real = context.context_attention
    monkeypatch.setattr(context, "context_attention", lambda q, *a, **k: calls.append(q.shape) or real(q, *a, **k))
    source = ["--hf", str(tmp_path / "hf"), "--token-ids", str(tmp_path / "ids.npy"), "--json"]
    nll = {}
    for flags in ([], ["--context", "4"], ["--context", "2", "--tensor", "2"]):
        calls.clear()
        score.main(source + flags + ["--batch-size", "2"])
        nll[" ".join(flags)] = json.loads(capsys.readouterr().out)["mean_nll"]
        assert bool(calls) == bool(flags), (flags, calls)
    for flags, got in nll.items():
        assert abs(got - want) < 1e-5 and abs(got - nll[""]) < 1e-5, (flags, got, want)
    # --dump-logits of rows (30 tokens) that the 4 devices do not divide: padded to split, cut back.
    np.save(tmp_path / "ids30.npy", ids[:, :30])
    dump = ["--token-ids", str(tmp_path / "ids30.npy"), "--dump-logits", str(tmp_path / "logits.npy")]
    score.main(source[:2] + dump + ["--context", "4"])
    assert "logits (3, 30, 160) float32" in capsys.readouterr().err
    dumped = torch.log_softmax(torch.as_tensor(np.load(tmp_path / "logits.npy")).double(), -1).numpy()
    np.testing.assert_allclose(dumped, logp[:, :30], atol=1e-4)

    for bad in ("3", "16"):
        with pytest.raises(SystemExit) as exit_:
            score.main(source + ["--context", bad])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and f"--context={bad}" in err, err

    # lm_eval's loglikelihood (launch.eval --context): continuations of the rows, split over 4 devices,
    # against transformers' log-probs and greedy choices.
    from lm.infer.load import load_hf_model
    from lm.infer.score import score_continuations

    items = [(row.tolist(), n) for row, n in zip(ids, (5, 20, 31))]
    loaded = load_hf_model(tmp_path / "hf", context=4, need_tokenizer=False)
    with loaded.layout:
        got = score_continuations(loaded.model, items, batch_size=3)
    for r, ((_, n), (split, greedy)) in enumerate(zip(items, got)):
        logp_r = logp[r, -n - 1 : -1]
        want_r, want_greedy = logp_r[np.arange(n), ids[r, -n:]].sum(), bool((logp_r.argmax(-1) == ids[r, -n:]).all())
        assert abs(split - want_r) < 1e-4 and greedy == want_greedy, (r, split, want_r)


def test_prefill_with_context_equals_one_device_and_decode_equals_recompute(monkeypatch):
    """generate() under mesh.context=4 x tensor=2: the prefill runs split (the context kernel runs at
    the prompt bucket), fills the KV cache of one device and picks its first tokens; the cached decode
    after it gives the tokens of recomputing the whole sequence every step."""
    from lm.infer.decode import _prefill_state, decode_twin, generate
    from lm.infer.sampling import Sampling
    from lm.kernels import context

    prompts = [np.random.default_rng(1).integers(1, CFG.vocab_size, n).tolist() for n in (50, 17, 33)]

    def prefill(model):
        graphdef, params = nnx.split(decode_twin(model), nnx.Not(nnx.Cache))  # as generate() prefills on CPU
        options = dict(vocab_size=CFG.vocab_size, sampling=Sampling(), eos_id=(),
                       key=jax.random.key(0), use_cache=True, cache_dtype=CFG.compute_dtype)  # fmt: skip
        _, state = _prefill_state(graphdef, params, prompts, 64, 8, **options)
        return [np.asarray(x) for x in jax.tree.leaves(state.cache)], np.asarray(state.last)

    want_cache, want_first = prefill(Transformer(CFG, rngs=nnx.Rngs(0)))  # one device, no mesh
    calls = []
    real = context.context_attention
    monkeypatch.setattr(context, "context_attention", lambda q, *a, **k: calls.append(q.shape) or real(q, *a, **k))
    layout = Layout.build(MeshConfig(data=1, fsdp=1, context=4, tensor=2))
    with layout:
        model = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), layout)
        cache, first = prefill(model)
        assert (3, 64, CFG.n_heads, CFG.dim_per_head) in calls, calls
        tokens = generate(model, prompts, max_new_tokens=8).tokens
        recomputed = generate(model, prompts, max_new_tokens=8, use_cache=False).tokens
    for got, want in zip(cache, want_cache):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.array_equal(first, want_first) and [row[0] for row in tokens] == first.tolist()
    assert tokens == recomputed
