"""Llama 3 8B pretraining on a TPU v6e-256 slice (FSDP over the slice, splash attention, 8192-token sequences).

Plan it first: python -m launch.plan --recipe llama3_8b_v6e_256
"""

from recipes._common import llama3_tpu


def recipe():
    return llama3_tpu("llama3_8b", "v6e-256", per_device_batch=2, remat="full", steps=100_000)
