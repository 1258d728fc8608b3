"""Qwen2.5 0.5B (Instruct or base), full fine-tune: every parameter trains in float32 with Adam, bfloat16
compute, one 24 GB GPU. Needs --set init.from=DIR (huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct).
"""

from lm.config import LoraConfig
from recipes._finetune import finetune


def recipe():
    r = finetune(
        "qwen2_5_0_5b_full",
        "qwen2_5_0_5b",
        "l4-24gb",
        "Full fine-tune of Qwen2.5 0.5B on chat JSONL (data/chat.jsonl), one 24 GB GPU",
        lora=LoraConfig(rank=0),
        seq_len=2048,
        batch_size=16,
        grad_accum=8,
        lr=1e-5,
        remat="full",
    )
    return r
