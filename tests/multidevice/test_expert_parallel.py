"""Expert parallelism on 8 fake CPU devices: the experts split over mesh.expert (alone and with
fsdp and tensor) give the single-device losses and gradient norms."""

import jax
import numpy as np
import pytest
from flax import nnx

from lm.config import MeshConfig, ModelConfig, OptimizerConfig
from lm.model import Transformer
from lm.state.optimizer import make_optimizer
from lm.train.step import train_step
from sharding.mesh import Layout, make_mesh
from sharding.partition import check_divisible, create_sharded, put_batch
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


def run_steps(shape, n=1):
    data, fsdp, tensor, expert = shape
    devices = jax.devices()[: data * fsdp * tensor * expert]
    layout = Layout(make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=expert), devices), RULES)
    check_divisible(CFG.logical_dims(), layout)

    def make():
        model = Transformer(CFG, rngs=nnx.Rngs(0))
        return model, make_optimizer(model, OptimizerConfig(lr=1e-2, warmup_steps=0), 10)

    model, opt = create_sharded(make, layout)
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
