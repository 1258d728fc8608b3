"""Qwen3-0.6B pretraining on 8 GPUs: FSDP over the box (its 151,936-token embedding alone is 0.6 GB in
float32), cuDNN flash attention, 4096-token sequences, ~1M tokens per step.

Data: launch.prepare token files in data/pretrain with a tokenizer of at most 151,936 pieces.
"""

from lm.config import MeshConfig, Recipe, TrainConfig, preset
from recipes._common import LLAMA_OPTIMIZER, prepared


def recipe():
    return Recipe(
        name="qwen3_0_6b",
        hardware="h100-80gb x8",
        description="Qwen3-0.6B pretraining on 8 H100s (FSDP); data: launch.prepare token files in data/pretrain",
        model=preset("qwen3_0_6b", attention_impl="cudnn", remat="dots_no_batch"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=prepared("data/pretrain"),
        optimizer=LLAMA_OPTIMIZER,
        train=TrainConfig(
            steps=50_000, batch_size=256, grad_accum=8, seq_len=4096, eval_every=1000, sample_prompt="The"
        ),
    )
