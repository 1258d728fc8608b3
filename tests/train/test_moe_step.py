"""The train step of a mixture-of-experts model: the router losses join the objective with their
coefficients, and the step reports them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm.config import ModelConfig
from lm.loss import cross_entropy_sum
from lm.model import Transformer
from lm.model.moe import aux_loss, z_loss
from lm.train.step import train_step

CFG = ModelConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4,
                  experts_per_token=2, moe_d_ff=32, router_aux_loss=0.3, router_z_loss=0.05, capacity_factor=1.0,
                  dtype="float32")  # fmt: skip


def test_router_losses_join_the_objective_and_the_metrics():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 17)), jnp.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)),
        "segment_ids": jnp.ones((4, 16), jnp.int32).at[3, 12:].set(0),  # a padded row tail
        "weights": jnp.ones((4, 16), jnp.float32).at[3, 12:].set(0.0),
    }
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))

    def objective(m):
        logits, stats = m(batch["tokens"], batch["positions"], batch["segment_ids"], return_router=True)
        ce, weight = cross_entropy_sum(logits, batch["targets"], batch["weights"])
        return ce / weight + 0.3 * aux_loss(stats) + 0.05 * z_loss(stats), (ce / weight, stats)

    (_, (ce, stats)), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    metrics = train_step(model, optimizer, batch)
    np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-6)
    np.testing.assert_allclose(metrics["aux_loss"], aux_loss(stats), rtol=1e-6)
    np.testing.assert_allclose(metrics["z_loss"], z_loss(stats), rtol=1e-6)
    assert metrics["expert_load_max_over_mean"].shape == (3,) and np.all(metrics["expert_load_max_over_mean"] >= 1)
    assert metrics["dropped"].shape == (3,)
    np.testing.assert_allclose(metrics["dropped"], stats.dropped, atol=1e-7)
    # SGD with rate 1: the update is the gradient of the whole objective.
    after = nnx.state(model, nnx.Param)
    for b, a, g in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(b - a, g, atol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
