"""qwen3_30b_a3b pretraining on a TPU v5p-128 slice: experts split over mesh.expert, the rest FSDP, splash attention.

Plan it first: python -m launch.plan --recipe qwen3_30b_a3b_v5p_128
"""

from recipes._common import moe_tpu


def recipe():
    return moe_tpu("qwen3_30b_a3b", "v5p-128", per_device_batch=4, expert=8, remat="full", steps=100_000)
