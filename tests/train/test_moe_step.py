"""The train step of a mixture-of-experts model: the router losses join the objective with their
coefficients, and the step reports them; a killed MoE run resumes bit for bit."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from faultkit import launch, wait_until
from flax import nnx
from helpers import final_params, losses, run_cli, tiny_train_args

from lm.config import ModelConfig
from lm.loss import cross_entropy_sum
from lm.model import Transformer
from lm.model.moe import aux_loss, z_loss
from lm.state.checkpoint import finished_steps
from lm.train.step import train_step

CFG = ModelConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4,
                  experts_per_token=2, moe_d_ff=32, router_aux_loss=0.3, router_z_loss=0.05, capacity_factor=1.0,
                  dtype="float32")  # fmt: skip


@pytest.mark.slow
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


@pytest.mark.slow
def test_killed_moe_run_resumes_bit_for_bit(tiny_corpus, tmp_path):
    """SIGKILL after the checkpoint at step 4 of an 8-step run with experts in every second layer
    (a mixed layer scan) and both router losses; the same command then ends where an uninterrupted
    run ends: the same losses, router metrics and parameters, bit for bit."""
    moe = [
        "model.n_layers=3", "model.n_experts=4", "model.experts_per_token=2", "model.moe_d_ff=64",
        "model.moe_layer_step=2", "model.router_aux_loss=0.01", "model.router_z_loss=0.001",
        "train.steps=8", "checkpoint.every=4", "train.log_every=1", "train.eval_every=100", "train.sample_tokens=0",
    ]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    out = run_cli(*tiny_train_args(tiny_corpus, straight, *moe))
    assert out.returncode == 0, out.stderr[-3000:]

    args = tiny_train_args(tiny_corpus, killed, *moe)
    proc = launch(args, tmp_path / "killed.log")
    try:
        past_checkpoint = lambda: 4 in finished_steps(killed / "checkpoints") and max(losses(killed), default=0) >= 5  # noqa: E731
        assert wait_until(past_checkpoint, proc) and proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 4" in out.stdout + out.stderr

    def rows(run_dir):
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert losses(killed) == losses(straight) and len(losses(straight)) == 8
    keys = ("loss", "aux_loss", "z_loss", "grad_norm")
    assert [{k: r.get(k) for k in keys} for r in rows(killed)] == [{k: r.get(k) for k in keys} for r in rows(straight)]
    for x, y in zip(final_params(straight, 8), final_params(killed, 8), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit
