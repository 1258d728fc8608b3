"""Llama 3.2 1B (Instruct or base), LoRA rank 16 on every attention and MLP projection, bfloat16 base, one
24 GB GPU (an L4 or an RTX 4090). Needs --set init.from=DIR (huggingface-cli download meta-llama/Llama-3.2-1B-Instruct).
"""

from lm.config import LoraConfig
from recipes._finetune import finetune


def recipe():
    return finetune(
        "llama3_2_1b_lora",
        "llama3_2_1b",
        "l4-24gb",
        "LoRA r16 of Llama 3.2 1B on chat JSONL (data/chat.jsonl), bf16 base, one 24 GB GPU",
        lora=LoraConfig(rank=16, alpha=32.0, base_dtype="bfloat16"),
        seq_len=2048,
        batch_size=16,
        grad_accum=4,
        lr=2e-4,
        remat="dots_no_batch",
    )
