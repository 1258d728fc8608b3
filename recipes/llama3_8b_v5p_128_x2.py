"""Llama 3 8B pretraining on two TPU v5p-128 slices: FSDP inside each slice, data parallel across them
(mesh.dcn_data=2), so only the gradient all-reduce crosses the data-centre network.

Plan it first: python -m launch.plan --recipe llama3_8b_v5p_128_x2
"""

from recipes._common import llama3_tpu


def recipe():
    return llama3_tpu("llama3_8b", "v5p-128 x2", per_device_batch=4, remat="full", dcn_data=2, steps=100_000)
