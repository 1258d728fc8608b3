"""The FLOP count behind MFU (ModelConfig.flops_per_token) against XLA's own count of the compiled
forward and backward pass: a full train step, and a LoRA step whose frozen base gets no weight gradient."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lm import lora
from lm.config import LoraConfig, ModelConfig
from lm.model import Transformer

# Unscanned, so that XLA's cost analysis sees every layer (a while loop's body is counted once).
CFG = ModelConfig(
    vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, max_seq_len=64, scan_layers=False
)
BATCH, T = 4, 64


def xla_flops(model, wrt) -> float:
    """FLOPs XLA counts for the loss and its gradient with respect to `wrt` only."""
    graphdef, params, rest = nnx.split(model, wrt, ...)
    tokens = jnp.zeros((BATCH, T), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T), (BATCH, T))

    def loss(p, r):
        logits = nnx.merge(graphdef, p, r)(tokens, positions)
        return jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0].mean()

    cost = jax.jit(jax.value_and_grad(loss)).lower(params, rest).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.slow
def test_flops_per_token_counts_what_is_computed_with_and_without_lora():
    full = xla_flops(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    assert abs(full / (CFG.flops_per_token(T) * BATCH * T) - 1) < 0.03

    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply(model, LoraConfig(rank=8, base_dtype="float32"), seed=0)
    adapters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    tuned = xla_flops(model, nnx.LoRAParam)
    assert abs(tuned / (CFG.flops_per_token(T, adapter_params=adapters) * BATCH * T) - 1) < 0.03
    # The full 6N would overcount a LoRA step by about a third here (MFU above 100% on a real fine-tune).
    assert CFG.flops_per_token(T) * BATCH * T > 1.2 * tuned
