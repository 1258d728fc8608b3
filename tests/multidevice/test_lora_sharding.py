"""On 8 fake CPU devices: LoRA adapters are sharded like the weights they adapt, and a sharded LoRA
(and nf4 QLoRA) step computes what the single-device step computes."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from lm import lora
from lm.config import LoraConfig, MeshConfig, ModelConfig, OptimizerConfig
from lm.state.optimizer import make_optimizer
from lm.train.step import train_step
from sharding.mesh import Layout, make_mesh
from sharding.partition import create_sharded, place, put_batch
from sharding.rules import logical_rules

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=64)
RULES = logical_rules()


def batch(n=16, length=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (n, length + 1)).astype(np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
        "segment_ids": np.ones((n, length), np.int32),
        "weights": np.ones((n, length), np.float32),
    }


def run(shape, base_dtype="float32", steps=2):
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), jax.devices()[: np.prod(shape)])
    from lm.model import Transformer

    layout = Layout(mesh, RULES)
    with layout:
        model = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), layout)
        lora.apply(model, LoraConfig(rank=4, alpha=8.0, base_dtype=base_dtype), seed=1)
        nnx.update(model, place(nnx.state(model, nnx.Any(nnx.LoRAParam, lora.Quantized, lora.DropoutSalt))))
        opt = make_optimizer(model, OptimizerConfig(lr=1e-2, warmup_steps=0), 10, wrt=nnx.LoRAParam)
        losses = [float(train_step(model, opt, put_batch(batch(seed=s), layout))["loss"]) for s in range(steps)]
    return model, losses


def spec(x):
    return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def test_adapters_are_sharded_like_their_base_weights():
    model, _ = run((1, 4, 2))
    q = model.blocks.attn.query
    assert spec(q.base.kernel[...]) == (None, "fsdp", "tensor", None)
    assert spec(q.lora_a[...]) == (None, "fsdp", None)  # [layers, embed, rank]
    assert spec(q.lora_b[...]) == (None, None, "tensor", None)  # [layers, rank, heads, head_dim]
    down = model.blocks.mlp.down
    assert spec(down.lora_a[...]) == (None, "tensor", None) and spec(down.lora_b[...]) == (None, None, "fsdp")


@functools.cache
def single_device_losses(base_dtype: str) -> list[float]:
    """The reference each sharded case compares with, computed once per base dtype."""
    return run((1, 1, 1), base_dtype)[1]


@pytest.mark.parametrize("base_dtype", ["float32", "nf4"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 4, 2), (2, 2, 2)])
def test_sharded_lora_steps_equal_single_device(shape, base_dtype):
    _, sharded = run(shape, base_dtype)
    np.testing.assert_allclose(sharded, single_device_losses(base_dtype), rtol=2e-5)
