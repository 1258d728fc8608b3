"""Gemma 2 2B (it or base), LoRA rank 16 on every attention and MLP projection, bfloat16 base, one 80 GB
GPU (an H100) at 4096 tokens. Needs --set init.from=DIR (huggingface-cli download google/gemma-2-2b-it).
"""

from lm.config import LoraConfig
from recipes._finetune import finetune


def recipe():
    return finetune(
        "gemma2_2b_lora",
        "gemma2_2b",
        "h100-80gb",
        "LoRA r16 of Gemma 2 2B on chat JSONL (data/chat.jsonl), bf16 base, one 80 GB GPU",
        lora=LoraConfig(rank=16, alpha=32.0, base_dtype="bfloat16"),
        seq_len=4096,
        batch_size=16,
        grad_accum=8,
        lr=2e-4,
        remat="dots_no_batch",
    )
