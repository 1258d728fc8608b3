"""Llama 3.1 8B continued pretraining at 65,536-token sequences on a TPU v5p-128 slice: each sequence
split over 8 chips (mesh.context=8, ring attention), FSDP over the other 8, remat=dots.

Plan it first: python -m launch.plan --recipe llama3_1_8b_64k
"""

import dataclasses

from lm.config import MeshConfig
from recipes._common import llama3_tpu


def recipe():
    base = llama3_tpu("llama3_1_8b", "v5p-128", per_device_batch=1, remat="dots", steps=10_000)
    return dataclasses.replace(
        base,
        name="llama3_1_8b_64k",
        description="Llama 3.1 8B at 64k context on v5p-128: context parallelism (ring) x FSDP; " + base.description,
        model=dataclasses.replace(base.model, attention_impl="xla", context_parallel="ring"),
        mesh=MeshConfig(data=1, fsdp=-1, context=8),
        train=dataclasses.replace(base.train, seq_len=65536, per_device_batch_size=1),
    )
