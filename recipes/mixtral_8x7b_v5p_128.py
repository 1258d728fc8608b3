"""mixtral_8x7b pretraining on a TPU v5p-128 slice: experts split over mesh.expert, the rest FSDP, splash attention.

Plan it first: python -m launch.plan --recipe mixtral_8x7b_v5p_128
"""

from recipes._common import moe_tpu


def recipe():
    return moe_tpu("mixtral_8x7b", "v5p-128", per_device_batch=4, expert=8, remat="full", steps=100_000)
