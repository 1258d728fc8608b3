"""The MoE train step lowered for TPU and GPU on this CPU: the grouped matmul is in the module
(megablox's Pallas kernel on TPU, XLA's ragged_dot on GPU), and dropless mode has no
[tokens, experts, ...] tensor, which the capacity dispatch does have."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model import Transformer

TOKENS, EXPERTS = 96, 8  # 2 rows of 48; numbers no other dimension of the model takes
CFG = ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, moe_d_ff=256,
                  n_experts=EXPERTS, dtype="bfloat16", attention_impl="xla")  # fmt: skip


def lowered(cfg, platform) -> str:
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, TOKENS // 2), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(TOKENS // 2), tokens.shape)

    def loss(state):
        return nnx.merge(graphdef, state)(tokens, positions).mean()

    return jax.jit(jax.grad(loss)).trace(state).lower(lowering_platforms=(platform,)).as_text()


def token_expert_tensors(text: str) -> list[str]:
    """Tensor types with a token axis, an expert axis and a third that is neither the layers (the
    scan stacks the router's logits) nor the top k: [tokens, experts, d_ff or capacity]."""
    shapes = re.findall(r"tensor<((?:\d+x)+)", text)
    dims = [[int(d) for d in s.rstrip("x").split("x")] for s in shapes]
    plain = {TOKENS, EXPERTS, CFG.n_layers, CFG.experts_per_token, 1}
    return [d for d in dims if {TOKENS, EXPERTS} <= set(d) and set(d) - plain]


# auto picks by the platform this process runs on (a CPU here); an explicit kernel is trusted, as
# model.attention_impl's are, so that it can be lowered for another platform.
@pytest.mark.parametrize(
    "platform, impl, marker", [("tpu", "megablox", "tpu_custom_call"), ("cuda", "ragged_dot", "chlo.ragged_dot")]
)
def test_dropless_lowers_to_grouped_matmuls_without_a_token_expert_tensor(platform, impl, marker):
    cfg = ModelConfig(**{**CFG.__dict__, "moe_impl": impl})
    text = lowered(cfg, platform)
    assert marker in text
    if platform == "tpu":
        assert "gmm" in text  # megablox's kernel, forward and backward
    assert not token_expert_tensors(text), token_expert_tensors(text)
    capacity = lowered(ModelConfig(**{**cfg.__dict__, "capacity_factor": 1.0}), platform)
    assert token_expert_tensors(capacity)  # the detector sees the capacity dispatch's [tokens, experts, capacity]


def test_expert_adapters_lower_to_grouped_matmuls_without_a_token_expert_tensor():
    """LoRA on the experts adds two grouped matmuls per projection through the rank, not a dense delta."""
    from lm import lora
    from lm.config import LoraConfig

    cfg = ModelConfig(**{**CFG.__dict__, "moe_impl": "ragged_dot"})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    lora.apply(model, LoraConfig(rank=8, targets=r".*mlp\.(gate|up|down)", base_dtype="bfloat16"))
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    tokens = jnp.zeros((2, TOKENS // 2), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(TOKENS // 2), tokens.shape)

    def loss(adapters, frozen):
        return nnx.merge(graphdef, adapters, frozen)(tokens, positions).mean()

    pure = nnx.as_pure(adapters), nnx.as_pure(frozen)
    text = jax.jit(jax.grad(loss)).trace(*pure).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("chlo.ragged_dot") >= 3 * 3  # forward: each projection's kernel, A and B
    assert not token_expert_tensors(text), token_expert_tensors(text)
