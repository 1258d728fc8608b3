"""Expert parallelism on 8 fake CPU devices: the experts split over mesh.expert (alone and with
fsdp and tensor) give the single-device losses and gradient norms, with and without LoRA adapters
on the experts."""

import jax
import numpy as np
import pytest
from flax import nnx

from lm import lora
from lm.config import LoraConfig, MeshConfig, ModelConfig, OptimizerConfig
from lm.model import Transformer
from lm.state.optimizer import make_optimizer
from lm.train.step import train_step
from sharding.mesh import Layout, make_mesh
from sharding.partition import check_divisible, create_sharded, place, put_batch
from sharding.rules import logical_rules

CFG = ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=64,
                  n_experts=8, experts_per_token=2, moe_d_ff=32, router_aux_loss=0.01, router_z_loss=0.001,
                  dtype="float32")  # fmt: skip
# (data, fsdp, tensor, expert)
MESHES = [(1, 1, 1, 2), (1, 1, 1, 8), (1, 2, 1, 4), (1, 2, 2, 2)]
RULES = logical_rules()


def batches(n, batch=16, length=16):
    rng = np.random.default_rng(0)
    for _ in range(n):
        tokens = rng.integers(0, CFG.vocab_size, (batch, length + 1)).astype(np.int32)
        yield {
            "tokens": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            "segment_ids": np.ones((batch, length), np.int32),
            "weights": np.ones((batch, length), np.float32),
        }


def run_steps(shape, n=1, adapters: LoraConfig | None = None):
    data, fsdp, tensor, expert = shape
    devices = jax.devices()[: data * fsdp * tensor * expert]
    layout = Layout(make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=expert), devices), RULES)
    check_divisible(CFG.logical_dims(), layout)

    def make():
        model = Transformer(CFG, rngs=nnx.Rngs(0))
        return model, make_optimizer(model, OptimizerConfig(lr=1e-2, warmup_steps=0), 10)

    if adapters is None:
        model, opt = create_sharded(make, layout)
    else:  # as lm.state.build does: the sharded base, then adapters placed by their logical names
        model = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), layout)
        with layout:
            lora.apply(model, adapters, seed=1)
            nnx.update(model, place(nnx.state(model, nnx.Any(nnx.LoRAParam, lora.Quantized, lora.DropoutSalt))))
            opt = make_optimizer(model, OptimizerConfig(lr=1e-2, warmup_steps=0), 10, wrt=nnx.LoRAParam)
    out = []
    with layout:
        hlo = train_step.trace(model, opt, put_batch(next(batches(1)), layout)).lower().as_text()
        for b in batches(n):
            m = train_step(model, opt, put_batch(b, layout))
            out.append((float(m["loss"]), float(m["grad_norm"]), float(m["aux_loss"])))
    return out, model, hlo


@pytest.fixture(scope="module")
def single_device():
    return run_steps((1, 1, 1, 1))[0]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "data{}_fsdp{}_tensor{}_expert{}".format(*s))
def test_expert_parallel_steps_match_single_device(shape, single_device):
    sharded, model, hlo = run_steps(shape)
    np.testing.assert_allclose(sharded, single_device, rtol=1e-5)
    # The experts really are split: each device holds n_experts / mesh.expert of them ...
    kernel = nnx.state(model, nnx.Param)["blocks"]["mlp"]["gate"]["kernel"].get_value()
    assert kernel.addressable_shards[0].data.shape[1] == CFG.n_experts // shape[3]
    # ... and the tokens travel to them and back by all-to-all (forward and backward).
    assert hlo.count("all_to_all") >= 4


EXPERT_LORA = LoraConfig(
    rank=4, alpha=8.0, targets=r".*(attn\.(query|value)|mlp\.(gate|up|down))", base_dtype="float32"
)
LORA_MESHES = [(1, 2, 1, 4), (1, 2, 2, 2)]


@pytest.fixture(scope="module")
def single_device_lora():
    return run_steps((1, 1, 1, 1), n=2, adapters=EXPERT_LORA)[0]


@pytest.mark.parametrize("shape", LORA_MESHES, ids=lambda s: "data{}_fsdp{}_tensor{}_expert{}".format(*s))
def test_expert_lora_steps_match_single_device(shape, single_device_lora):
    """Two steps, so the second runs (and differentiates) adapters whose B is no longer zero."""
    sharded, model, hlo = run_steps(shape, n=2, adapters=EXPERT_LORA)
    np.testing.assert_allclose(sharded, single_device_lora, rtol=1e-5)
    up = model.blocks.mlp.up
    assert isinstance(up, lora.ExpertLoRA)
    # Each device holds its experts' adapters, split like their kernels (and B's width over tensor).
    assert up.lora_a[...].addressable_shards[0].data.shape[1] == CFG.n_experts // shape[3]
    assert up.lora_b[...].addressable_shards[0].data.shape[-1] == CFG.moe_d_ff // shape[2]
    assert hlo.count("all_to_all") >= 4
