"""The GRPO optimizer step on a full fine-tune, whose reference is a frozen copy of the initial
weights: grad_accum microbatches give the one-big-batch step (DPO's: tests/multidevice/test_mesh_training.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lm.data.preference import completion_batch
from lm.model import Transformer
from lm.train.objectives import group_advantages, reference_token_logps, token_logps
from lm.train.step import grpo_train_step


def frozen_copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))


def policy_and_reference(cfg):
    """A policy moved off its initial weights (else DPO's first step has zero margin) and the frozen
    initial weights as its reference; SGD, so the update is the gradient itself."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    reference = frozen_copy(model)
    noise = jax.random.split(jax.random.key(5), len(jax.tree.leaves(nnx.state(model, nnx.Param))))
    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
    nnx.update(
        model, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise)])
    )
    return model, reference, nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def cfg():
    from lm.config import ModelConfig

    return ModelConfig(
        vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32, dtype="float32"
    )


@pytest.mark.slow
def test_grpo_grad_accum_equals_one_big_batch_on_a_full_fine_tune(cfg):
    """loss_type=grpo: each microbatch's mean over completions is a 1/grad_accum share (dapo's divisor is
    the whole batch's token count, which the step passes every microbatch)."""
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, 127, rng.integers(2, 5))) for _ in range(2) for _ in range(4)]
    completions = [list(rng.integers(1, 127, rng.integers(1, 9))) for _ in prompts]
    batch = {k: jnp.asarray(v) for k, v in completion_batch(prompts, completions, 16).items()}
    advantages = jnp.asarray(group_advantages(rng.normal(size=len(prompts)), 4))
    model, reference, _ = policy_and_reference(cfg)
    logps, ref = nnx.jit(lambda m, r: (token_logps(m, batch, 0.7), reference_token_logps(m, batch, 0.7, r)))(
        model, reference
    )
    old = jnp.where(batch["weights"] > 0, logps + 0.3 * jax.random.normal(jax.random.key(2), logps.shape), 0.0)
    out = {}
    for k in (1, 4):
        model, _, opt = policy_and_reference(cfg)
        metrics = grpo_train_step(
            model, opt, batch, old, ref, advantages, beta=0.05, epsilon=0.2, temperature=0.7, loss_type="grpo",
            grad_accum=k,
        )  # fmt: skip
        out[k] = jax.device_get(metrics), params(model)
    (m1, p1), (m4, p4) = out[1], out[4]
    assert 0 < m1["clip_fraction"] < 1 and m1["kl"] > 1e-4
    for key in ("loss", "grad_norm", "kl", "clip_fraction"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(p1, p4, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
