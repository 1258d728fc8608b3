"""Llama 3.1 8B (Instruct or base), QLoRA: the frozen base in nf4 (4-bit NormalFloat, blocks of 64), LoRA
rank 16 on every attention and MLP projection, one 24 GB GPU (an L4 or an RTX 4090), full remat.
Needs --set init.from=DIR (huggingface-cli download meta-llama/Llama-3.1-8B-Instruct).
"""

from lm.config import LoraConfig
from recipes._finetune import finetune


def recipe():
    return finetune(
        "llama3_1_8b_qlora_24gb",
        "llama3_1_8b",
        "l4-24gb",
        "QLoRA (nf4 base) r16 of Llama 3.1 8B on chat JSONL (data/chat.jsonl), one 24 GB GPU",
        lora=LoraConfig(rank=16, alpha=32.0, base_dtype="nf4"),
        seq_len=2048,
        batch_size=16,
        grad_accum=16,
        lr=2e-4,
        remat="full",
    )
