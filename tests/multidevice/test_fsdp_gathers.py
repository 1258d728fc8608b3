"""On 8 fake CPU devices: FSDP all-gathers move weights in the compute dtype, not float32."""

import re

import numpy as np
from flax import nnx

from lm.config import MeshConfig, ModelConfig, OptimizerConfig
from lm.model import Transformer
from lm.state.optimizer import make_optimizer
from lm.train.step import train_step
from sharding.mesh import Layout
from sharding.partition import create_sharded, put_batch


def test_fsdp_gathers_bfloat16_weights(tmp_path):
    """Read the HLO right after XLA's SPMD partitioner: XLA:CPU later widens bf16 dots (and their
    gathers) to float32, which a GPU or TPU does not, so the final CPU module cannot tell."""
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, d_ff=128, dtype="bfloat16")
    layout = Layout.build(MeshConfig(data=1, fsdp=8, tensor=1))

    def make():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        return model, make_optimizer(model, OptimizerConfig(), 10)

    with layout:
        model, opt = create_sharded(make, layout)
        ids = np.zeros((16, 32), np.int32)
        batch = {"tokens": ids, "targets": ids, "positions": ids, "segment_ids": ids + 1}
        batch = put_batch({**batch, "weights": np.ones((16, 32), np.float32)}, layout)
        options = {"xla_dump_to": str(tmp_path), "xla_dump_hlo_pass_re": "spmd-partitioning"}
        train_step.trace(model, opt, batch).lower().compile(compiler_options=options)
    (after,) = tmp_path.glob("*jit_train_step*after_spmd-partitioning*.txt")
    gathers = re.findall(r"= (\w+)\[[\d,]*\]\{[\d,]*\} all-gather\(.*op_name=\"([^\"]+)\"", after.read_text())
    forward = [dtype for dtype, op in gathers if "transpose(" not in op]
    # Per layer q, k, v, out, up, gate, down, plus the embedding table and the LM head.
    assert len(forward) >= 9 and set(forward) == {"bf16"}, gathers
