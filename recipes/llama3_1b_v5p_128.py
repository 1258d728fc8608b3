"""Llama 3.2 1B pretraining on a TPU v5p-128 slice (FSDP over the slice, splash attention, 8192-token sequences).

Plan it first: python -m launch.plan --recipe llama3_1b_v5p_128
"""

from recipes._common import llama3_tpu


def recipe():
    return llama3_tpu("llama3_1b", "v5p-128", per_device_batch=4, remat="dots_no_batch", steps=100_000)
