"""The mixture-of-experts layer against independent computations: a numpy loop over experts,
transformers' load-balancing loss, and the dropless and capacity dispatches against each other."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.errors import UserError
from lm.model import moe
from lm.model.blocks import MoE

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4,
                  experts_per_token=2, moe_d_ff=24, dtype="float32")  # fmt: skip
VARIANTS = {
    "mixtral_qwen3_moe": dict(n_experts=6, experts_per_token=3),  # renormalised top-k
    "qwen2_moe": dict(router_norm_topk=False, n_shared_experts=1, shared_expert_d_ff=40),
}


def silu(x):
    return x / (1 + np.exp(-x))


def numpy_moe(layer: MoE, x: np.ndarray, cfg: ModelConfig, capacity: int | None = None) -> np.ndarray:
    """The layer token by token, expert by expert, in float64: softmax over all experts, top k,
    renormalised or not; with a capacity, first choices claim expert slots before second choices."""
    p = {k: np.asarray(v, np.float64) for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    router, gate, up, down = (p[(n, "kernel")] for n in ("router", "gate", "up", "down"))
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, : cfg.experts_per_token]
    y = np.zeros_like(x)
    taken = np.zeros(cfg.n_experts, int)
    for choice in range(cfg.experts_per_token):
        for t in range(x.shape[0]):
            e = top[t, choice]
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            w = probs[t, e] / (probs[t, top[t]].sum() if cfg.router_norm_topk else 1.0)
            y[t] += w * ((silu(x[t] @ gate[e]) * (x[t] @ up[e])) @ down[e])
    if cfg.shared_d_ff:
        shared = silu(x @ p[("shared", "gate", "kernel")]) * (x @ p[("shared", "up", "kernel")])
        g = 1 / (1 + np.exp(-(x @ p[("shared_gate", "kernel")])))
        y += g * (shared @ p[("shared", "down", "kernel")])
    return y


def layer_and_input(cfg, n=24, seed=0):
    layer = MoE(cfg, rngs=nnx.Rngs(seed))
    # Routers as large as a trained model's, so top-k picks are far from ties.
    layer.router.kernel[...] = layer.router.kernel[...] * 40
    x = np.random.default_rng(seed).normal(size=(1, n, cfg.d_model)).astype(np.float32)
    return layer, x


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropless_and_capacity_equal_a_numpy_loop_over_experts(variant):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    layer, x = layer_and_input(cfg)
    want = numpy_moe(layer, x[0].astype(np.float64), cfg)
    forward = nnx.jit(lambda layer, x: layer(x))  # jitted: eager, the dispatch's scans took ~20 s a variant
    dropless, _ = forward(layer, jnp.asarray(x))
    roomy = nnx.merge(*nnx.split(layer))
    roomy.cfg = dataclasses.replace(cfg, capacity_factor=float(cfg.n_experts))  # room for every assignment
    capped, stats = forward(roomy, jnp.asarray(x))
    np.testing.assert_allclose(dropless[0], want, atol=2e-5)
    np.testing.assert_allclose(capped[0], want, atol=2e-5)
    assert float(stats.dropped) == 0.0

    def loss(layer, x):
        y, _ = layer(x)
        return jnp.sum(jnp.sin(y))  # a loss whose gradient differs per output element

    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    g_dropless, g_capped = grad(layer, jnp.asarray(x)), grad(roomy, jnp.asarray(x))
    for a, b in zip(jax.tree.leaves(g_dropless), jax.tree.leaves(g_capped), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    # The gradient with respect to the input against central differences of the numpy loop.
    rng = np.random.default_rng(1)
    direction = rng.normal(size=x.shape[1:])
    eps = 1e-4
    x64 = x[0].astype(np.float64)
    numeric = (
        np.sin(numpy_moe(layer, x64 + eps * direction, cfg)).sum()
        - np.sin(numpy_moe(layer, x64 - eps * direction, cfg)).sum()
    ) / (2 * eps)
    analytic = float(np.sum(np.asarray(g_dropless[1][0], np.float64) * direction))
    assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(numeric))


def test_capacity_drops_what_a_numpy_loop_drops():
    cfg = dataclasses.replace(CFG, capacity_factor=0.5)
    layer, x = layer_and_input(cfg, n=32, seed=3)
    c = moe.capacity(32, cfg)
    want = numpy_moe(layer, x[0].astype(np.float64), cfg, capacity=c)
    got, stats = layer(jnp.asarray(x))
    np.testing.assert_allclose(got[0], want, atol=2e-5)
    # With half an even share of room, at least half the assignments find their expert full.
    assert float(stats.dropped) >= 0.5


def test_aux_loss_equals_transformers_load_balancing_loss():
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = dataclasses.replace(CFG, n_experts=8, experts_per_token=2)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 40, 8)).astype(np.float32) * 2  # 3 layers' router logits
    per_layer = []
    for layer_logits in logits:
        probs, _, experts = moe.route(jnp.asarray(layer_logits), cfg)
        per_layer.append(moe.router_stats(jnp.asarray(layer_logits), probs, experts, None, jnp.ones(40)))
    stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    want = load_balancing_loss_func(tuple(torch.tensor(g) for g in logits), 8, 2)
    np.testing.assert_allclose(float(moe.aux_loss(stats)), float(want), rtol=1e-6)
    # z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers.
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(moe.z_loss(stats)), (lse**2).mean(), rtol=1e-6)
    # Each token's k choices are counted: the load sums to experts_per_token.
    np.testing.assert_allclose(np.asarray(stats.load.sum(-1)), 2.0, rtol=1e-6)


@pytest.mark.slow
def test_padding_is_left_out_of_the_router_statistics():
    layer, x = layer_and_input(CFG, n=16)
    valid = jnp.arange(16)[None] < 10
    _, masked = layer(jnp.asarray(x), valid)
    _, first = layer(jnp.asarray(x[:, :10]))
    for a, b in zip(masked, first, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_grouped_matmul_megablox_interpreted_and_tiled_equal_ragged_dot():
    from lm.kernels import grouped_matmul

    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(200, 128)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 128, 128)), jnp.float32)
    sizes = jnp.asarray([70, 0, 120], jnp.int32)  # 10 rows in no group come out zero
    ragged = grouped_matmul(lhs, rhs, sizes, impl="ragged_dot")
    kernel = grouped_matmul(lhs, rhs, sizes, impl="megablox_interpret")
    np.testing.assert_allclose(kernel, ragged, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(ragged[190:], 0.0)
    # The tiled scan (auto on CPU), forward and both gradients, with a group over several tiles, an
    # empty group and rows past the groups.
    sizes = jnp.asarray([130, 0, 60], jnp.int32)
    w = jnp.asarray(rng.normal(size=(200, 128)), jnp.float32)

    def loss(impl):
        return jax.value_and_grad(lambda x, r: (grouped_matmul(x, r, sizes, impl=impl) * w).sum(), (0, 1))(lhs, rhs)

    (want, want_grads), (got, got_grads) = loss("ragged_dot"), loss("tiled")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(grouped_matmul(lhs, rhs, sizes, impl="tiled")[190:], 0.0)


def test_invalid_moe_configs_are_one_line_user_errors():
    for bad in (
        dict(experts_per_token=5),
        dict(n_experts=-1),
        dict(mlp="gelu"),
        dict(capacity_factor=0.0),
        dict(dense_layers=(7,)),
        dict(dense_layers=(0, 1), scan_layers=False),  # no layer left with experts
        dict(router_aux_loss=-1.0),
    ):
        with pytest.raises(UserError) as e:
            dataclasses.replace(CFG, **bad)
        assert "\n" not in str(e.value)
    mixed = dataclasses.replace(CFG, n_layers=4, moe_layer_step=2, dense_layers=(3,), scan_layers=False)
    assert mixed.moe_layers == (False, True, False, False)
    # The layer scan's runs lay end to end as the layers: periods of moe_layer_step, equal ones merged.
    assert mixed.layer_runs == (((False, True), 1), ((False, False), 1))
    first_dense = dataclasses.replace(CFG, n_layers=5, dense_layers=(0,))
    assert first_dense.layer_runs == (((False,), 1), ((True,), 4))


def test_mesh_expert_must_divide_the_experts():
    from jax.sharding import AbstractMesh, AxisType

    from sharding.mesh import AXES, Layout
    from sharding.partition import check_divisible
    from sharding.rules import logical_rules

    mesh = AbstractMesh((1, 1, 1, 1, 4), AXES, axis_types=(AxisType.Auto,) * len(AXES))
    check_divisible(dataclasses.replace(CFG, n_experts=8).logical_dims(), Layout(mesh, logical_rules()))
    with pytest.raises(UserError, match=r"model.n_experts=6 is not divisible by mesh.expert=4; choose mesh.expert in"):
        check_divisible(dataclasses.replace(CFG, n_experts=6).logical_dims(), Layout(mesh, logical_rules()))


def test_active_params_count_k_of_the_routed_experts():
    from lm.model import Transformer

    cfg = dataclasses.replace(CFG, **VARIANTS["qwen2_moe"])
    params = dict(nnx.to_flat_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    total = sum(v.get_value().size for v in params.values())
    routed = sum(
        v.get_value().size for p, v in params.items() if p[-3:-1] in (("mlp", "gate"), ("mlp", "up"), ("mlp", "down"))
    )
    assert cfg.n_params == total
    assert cfg.n_active_params == total - routed * (cfg.n_experts - cfg.experts_per_token) // cfg.n_experts
    # MFU counts what is computed: the FLOPs follow the active parameters, not the total.
    assert cfg.flops_per_token(16) < dataclasses.replace(cfg, experts_per_token=cfg.n_experts).flops_per_token(16)
