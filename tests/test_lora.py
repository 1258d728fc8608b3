"""LoRA and QLoRA (lm.lora): exactness of a fresh adapter and of merging, what trains, what is frozen."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import lora
from lm.config import LoraConfig, ModelConfig, OptimizerConfig
from lm.errors import UserError
from lm.hf import save_peft
from lm.model import Transformer
from lm.state.optimizer import make_optimizer
from lm.train.step import train_step

CFG = ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64, dtype="float32"
)
MOE = dict(n_experts=4, experts_per_token=2, moe_d_ff=24)  # an MoE variant of CFG


def model(scan=True, **kw):
    return Transformer(dataclasses.replace(CFG, scan_layers=scan, **kw), rngs=nnx.Rngs(0))


def inputs(batch=2, length=16, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)
    return tokens, jnp.broadcast_to(jnp.arange(length), (batch, length))


def batch(seed=1, batch=4, length=16):
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (batch, length + 1), 0, 32))
    return {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "positions": jnp.broadcast_to(jnp.arange(length), (batch, length)),
        "segment_ids": jnp.ones((batch, length), jnp.int32),
        "weights": jnp.ones((batch, length), jnp.float32),
    }


def spec(base_dtype="float32", **kw):
    return LoraConfig(rank=4, alpha=8.0, base_dtype=base_dtype, **kw)


def perturb(m, scale=0.05):
    """Give the adapters non-zero B (a fresh one is exactly zero) so merging has something to fold."""
    state = nnx.state(m, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(m, jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("extra", [{}, {"qkv_bias": True, "mlp_bias": True}], ids=["nobias", "bias"])
def test_fresh_adapter_leaves_logits_unchanged(scan, extra):
    m = model(scan, **extra)
    tokens, positions = inputs()
    before = m(tokens, positions)
    paths = lora.apply(m, spec())
    assert len(paths) == 7 * (1 if scan else CFG.n_layers)
    np.testing.assert_array_equal(np.asarray(m(tokens, positions)), np.asarray(before))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_merge_then_forward_equals_adapter_forward(scan):
    m = model(scan, qkv_bias=True)
    tokens, positions = inputs()
    lora.apply(m, spec())
    perturb(m)
    adapted = np.asarray(m(tokens, positions))
    lora.merge(m)
    assert not lora.adapters(m) and not jax.tree.leaves(nnx.state(m, nnx.LoRAParam))
    merged = np.asarray(m(tokens, positions))
    assert np.abs(adapted - merged).max() < 1e-5
    # The adapter really moved the outputs, so the comparison above is not trivially true.
    assert np.abs(adapted - np.asarray(model(scan, qkv_bias=True)(tokens, positions))).max() > 1e-2


def test_adapter_delta_equals_the_low_rank_product_computed_by_hand():
    m = model(scan=False)
    lora.apply(m, spec(targets=r"blocks\.0\.attn\.query"))
    perturb(m)
    q = m.blocks[0].attn.query
    x = jax.random.normal(jax.random.key(3), (2, 5, CFG.d_model))
    a, b, w = np.asarray(q.lora_a[...]), np.asarray(q.lora_b[...]), np.asarray(q.base.kernel[...])
    expected = np.einsum("bld,dhk->blhk", x, w) + 2.0 * np.einsum("bld,dr,rhk->blhk", x, a, b)
    np.testing.assert_allclose(np.asarray(q(x)), expected, atol=1e-5)


def test_training_changes_only_the_adapters():
    m = model()
    lora.apply(m, spec())
    frozen_before = jax.tree.map(np.asarray, nnx.state(m, lora.FROZEN))
    adapters_before = jax.tree.map(np.asarray, nnx.state(m, nnx.LoRAParam))
    opt = make_optimizer(m, OptimizerConfig(lr=1e-2, warmup_steps=0), 10, wrt=nnx.LoRAParam)
    # Adam state exists for the adapters only: no moments for any frozen weight.
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters_before))
    n_moments = sum(x.size for x in jax.tree.leaves(nnx.state(opt)) if x.ndim > 0)
    assert n_moments == 2 * n_adapter
    losses = [float(train_step(m, opt, batch(seed=0))["loss"]) for _ in range(5)]
    assert losses[-1] < losses[0]
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(nnx.state(m, lora.FROZEN))):
        np.testing.assert_array_equal(before, np.asarray(after))  # the base is bit-identical
    changed = [
        not np.array_equal(b, np.asarray(a))
        for b, a in zip(jax.tree.leaves(adapters_before), jax.tree.leaves(nnx.state(m, nnx.LoRAParam)))
    ]
    assert all(changed)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_qlora_base_is_quantised_and_its_loss_falls(qtype):
    m = model()
    tokens, positions = inputs()
    full = np.asarray(m(tokens, positions))
    lora.apply(m, spec(base_dtype=qtype))
    q = m.blocks.mlp.up
    assert q.qvalue.dtype == (jnp.uint4 if qtype == "nf4" else jnp.int8) and q.base.kernel is None
    # The quantised base moves the logits by the quantisation error only.
    error = np.abs(np.asarray(m(tokens, positions)) - full).max()
    assert 0 < error < (0.2 if qtype == "nf4" else 0.02)
    # The frozen rest (norms, embeddings) is stored in bfloat16.
    assert m.embed.embedding.dtype == jnp.bfloat16
    quantised = jax.tree.map(np.asarray, nnx.state(m, lora.Quantized))
    opt = make_optimizer(m, OptimizerConfig(lr=1e-2, warmup_steps=0), 10, wrt=nnx.LoRAParam)
    losses = [float(train_step(m, opt, batch(seed=0))["loss"]) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05
    for before, after in zip(jax.tree.leaves(quantised), jax.tree.leaves(nnx.state(m, lora.Quantized))):
        np.testing.assert_array_equal(before, np.asarray(after))


def test_adapters_are_named_like_their_base_weights():
    m = model()
    lora.apply(m, spec())
    names = {
        ".".join(map(str, p)): v.get_metadata()["out_sharding"]
        for p, v in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam))
    }
    assert names["blocks.attn.query.lora_a"] == ("layers", "embed", None)
    assert names["blocks.attn.query.lora_b"] == ("layers", None, "heads", "head_dim")
    assert names["blocks.attn.key.lora_b"] == ("layers", None, "kv_heads", "head_dim")
    assert names["blocks.attn.out.lora_a"] == ("layers", "heads", "head_dim", None)
    assert names["blocks.attn.out.lora_b"] == ("layers", None, "embed")
    assert names["blocks.mlp.down.lora_a"] == ("layers", "mlp", None)


def test_targets_regex_selects_modules_and_rejects_no_match():
    m = model()
    assert lora.apply(m, spec(targets=r".*attn\.(query|value)")) == ["blocks.attn.query", "blocks.attn.value"]
    with pytest.raises(UserError, match="matches no projection"):
        lora.apply(model(), spec(targets=r"nothing"))


# ------------------------------------------------------------------------------------------------
# Against peft and transformers, on a tiny random Llama the test saves itself


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_builders import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("hf") / "llama", None, vocab_size=256)


def adapted_llama(folder):
    from lm.hf import load_hf

    model = load_hf(folder, dtype="float32", param_dtype="float32")
    lora.apply(model, spec())
    perturb(model)
    return model


def torch_logits(hf_model, tokens):
    import torch

    with torch.no_grad():
        return hf_model(torch.as_tensor(np.array(tokens))).logits.float().numpy()


def test_peft_applied_to_the_base_gives_our_logits(hf_llama, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    model = adapted_llama(hf_llama)
    tokens, positions = inputs()
    ours = np.asarray(model(tokens, positions))
    save_peft(model, spec(), tmp_path / "adapter", base_model_name_or_path=str(hf_llama))
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype="float32")
    theirs = torch_logits(peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    plain = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype="float32"), tokens)
    assert np.abs(theirs - plain).max() > 1e-2  # the adapter mattered


def test_merged_export_loads_in_transformers_with_our_logits(hf_llama, tmp_path):
    import transformers

    from lm.hf import save_hf

    model = adapted_llama(hf_llama)
    tokens, positions = inputs()
    ours = np.asarray(model(tokens, positions))
    save_hf(lora.merge(model), tmp_path / "merged")
    theirs = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def keyed(m, key: int):
    """A copy of m whose adapters drop with this key, as the train step's copy does."""
    m = nnx.clone(m)
    lora.seed_dropout(m, jax.random.key(key))
    return m


@pytest.mark.slow
def test_dropout_acts_in_training_steps_only_and_is_reproducible():
    m = model()
    lora.apply(m, spec(dropout=0.5))
    perturb(m)
    tokens, positions = inputs()
    plain = np.asarray(m(tokens, positions))  # no key set: eval and decode never drop
    a, b, c = (np.asarray(keyed(m, key)(tokens, positions)) for key in (1, 1, 2))
    np.testing.assert_array_equal(np.asarray(m(tokens, positions)), plain)  # the keyed copies left m alone
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    opt = make_optimizer(m, OptimizerConfig(lr=1e-2, warmup_steps=0), 10, wrt=nnx.LoRAParam)
    losses = [float(train_step(m, opt, batch(seed=0))["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype, scan", [("nf4", True), ("bfloat16", False)], ids=["nf4-scanned", "bf16-unrolled"])
def test_merge_into_the_original_base_is_exact_and_keeps_its_dtype(base_dtype, scan):
    """A QLoRA or bfloat16-base run's merged export: base + scale * A B over the float32 weights that
    init.from holds, float32 like them (no 4-bit rounding, no bfloat16 under a float32 label)."""
    m, original = model(scan), model(scan)
    lora.apply(m, spec(base_dtype))
    perturb(m)
    folded = {}
    for path, module in lora.adapters(m).items():
        a, b = np.asarray(module.lora_a[...], np.float64), np.asarray(module.lora_b[...], np.float64)
        folded[path] = (a, b, module.scale, module.n_in)
    own = nnx.state(lora.merge(nnx.clone(m)), nnx.Param)  # the run's own base: rounded to 4 bits or bfloat16
    merged = lora.merge(m, original)
    assert merged is original and not lora.adapters(merged)
    plain, own = dict(nnx.to_flat_state(nnx.state(model(scan), nnx.Param))), dict(nnx.to_flat_state(own))
    for path, var in nnx.to_flat_state(nnx.state(merged, nnx.Param)):
        dotted = ".".join(map(str, path[:-1]))
        assert var.dtype == jnp.float32, path
        if dotted not in folded:
            np.testing.assert_array_equal(var[...], plain[path][...])
            continue
        a, b, scale, n_in = folded[dotted]
        lead = a.ndim - n_in - 1
        delta = a.reshape(*a.shape[:lead], -1, a.shape[-1]) @ b.reshape(*b.shape[: lead + 1], -1)
        want = np.asarray(plain[path][...], np.float64) + scale * delta.reshape(var.shape)
        np.testing.assert_allclose(var[...], want, atol=2e-6, rtol=0)
        assert np.abs(np.asarray(own[path][...], np.float64) - want).max() > 1e-4  # what the old merge wrote


# ------------------------------------------------------------------------------------------------
# Adapters on the experts of an MoE layer: one per expert, applied by the dispatch itself


def silu(x):
    return x / (1 + np.exp(-x))


def numpy_adapted_moe(layer, x: np.ndarray, cfg: ModelConfig, scale: float) -> np.ndarray:
    """The layer token by token, expert by expert, in float64, each projection x W_e + scale (x A_e) B_e."""
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    router = f64(layer.router.kernel)

    def project(p, e, h):
        return h @ f64(p.base.kernel)[e] + scale * (h @ f64(p.lora_a)[e]) @ f64(p.lora_b)[e]

    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[: cfg.experts_per_token]
        for e in top:
            h = silu(project(layer.gate, e, x[t])) * project(layer.up, e, x[t])
            y[t] += probs[t, e] / probs[t, top].sum() * project(layer.down, e, h)
    return y


@pytest.mark.slow
def test_expert_adapters_equal_a_numpy_loop_over_experts_dropless_capacity_and_merged():
    from lm.model.blocks import MoE

    cfg = dataclasses.replace(CFG, **MOE)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    layer.router.kernel[...] = layer.router.kernel[...] * 40  # far from top-k ties
    assert lora.apply(layer, spec(targets=r"gate|up|down")) == ["down", "gate", "up"]
    assert isinstance(layer.gate, lora.ExpertLoRA) and layer.gate.lora_a.shape == (4, CFG.d_model, 4)
    perturb(layer, scale=0.3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 24, CFG.d_model)), jnp.float32)
    want = numpy_adapted_moe(layer, np.asarray(x[0], np.float64), cfg, spec().scale)
    forward = nnx.jit(lambda layer, x: layer(x)[0][0])
    roomy = nnx.clone(layer)
    roomy.cfg = dataclasses.replace(cfg, capacity_factor=4.0)  # room for every assignment: the einsum path
    np.testing.assert_allclose(forward(layer, x), want, atol=3e-5)  # grouped matmuls on the sorted rows
    np.testing.assert_allclose(forward(roomy, x), want, atol=3e-5)
    with lora.adapters_off(layer):
        assert np.abs(np.asarray(forward(layer, x)) - want).max() > 1e-2  # the adapters mattered

    graphdef, adapters, frozen = nnx.split(layer, nnx.LoRAParam, ...)
    adapters, frozen = nnx.as_pure(adapters), nnx.as_pure(frozen)  # plain arrays: fresh Variables when merged
    grads = jax.jit(jax.grad(lambda a, f: jnp.sum(jnp.sin(nnx.merge(graphdef, a, f)(x)[0]))))(adapters, frozen)
    norms = np.linalg.norm(np.asarray(grads["up"]["lora_b"]).reshape(4, -1), axis=-1)
    assert (norms > 0).all()  # each expert got tokens here, and its own adapter's gradient
    lora.merge(layer)  # each expert's own A_e B_e folded into its kernel
    assert not lora.adapters(layer)
    np.testing.assert_allclose(forward(layer, x), want, atol=3e-5)


def test_nf4_experts_are_quantised_per_expert():
    from lm.model.blocks import MoE

    layer = MoE(dataclasses.replace(CFG, **MOE), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 24, CFG.d_model)), jnp.float32)
    forward = nnx.jit(lambda layer: layer(x)[0])
    full = np.asarray(forward(layer))
    lora.apply(layer, spec(targets=r"gate|up|down", base_dtype="nf4"))
    assert layer.up.base.kernel is None and layer.up.qvalue.dtype == jnp.uint4
    # One scale per expert and output channel per block of inputs (64, or all 64 of d_model here).
    assert layer.up.qvalue.shape == (4, CFG.d_model, 24) and layer.up.qscale.shape == (4, 1, 24)
    assert 0 < np.abs(np.asarray(forward(layer)) - full).max() < 0.2  # the quantisation error only


def test_expert_adapters_refuse_dropout():
    with pytest.raises(UserError, match="lora.dropout=0.1 cannot reach the expert adapters"):
        lora.apply(model(**MOE), spec(dropout=0.1))
