"""Qwen3-30B-A3B (Instruct or base), QLoRA: the frozen base in nf4 (4-bit NormalFloat, blocks of 64), LoRA
rank 8 on every attention projection and on each of the 128 experts of every layer (one adapter per
expert), one 80 GB GPU (an H100), full remat. Needs --set init.from=DIR
(huggingface-cli download Qwen/Qwen3-30B-A3B-Instruct-2507).
"""

from lm.config import LoraConfig
from recipes._finetune import finetune


def recipe():
    return finetune(
        "qwen3_30b_a3b_qlora_80gb",
        "qwen3_30b_a3b",
        "h100-80gb",
        "QLoRA (nf4 base) r8 of Qwen3-30B-A3B, attention and every expert, on chat JSONL, one 80 GB GPU",
        lora=LoraConfig(rank=8, alpha=16.0, base_dtype="nf4"),
        seq_len=4096,
        batch_size=16,
        grad_accum=8,
        lr=2e-4,
        remat="full",
    )
