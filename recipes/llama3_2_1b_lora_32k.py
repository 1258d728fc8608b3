"""Llama 3.2 1B (Instruct or base), LoRA rank 16 at 32,768-token sequences on one 80 GB GPU: cuDNN
flash attention keeps attention memory linear in the length and remat=dots recomputes only
the elementwise work; the long-document fine-tune that fits a single H100 or A100 80 GB.
Needs --set init.from=DIR (huggingface-cli download meta-llama/Llama-3.2-1B-Instruct).
"""

from lm.config import LoraConfig
from recipes._finetune import finetune


def recipe():
    return finetune(
        "llama3_2_1b_lora_32k",
        "llama3_2_1b",
        "h100-80gb",
        "LoRA r16 of Llama 3.2 1B at 32k context on chat JSONL (data/chat.jsonl), bf16 base, one 80 GB GPU",
        lora=LoraConfig(rank=16, alpha=32.0, base_dtype="bfloat16"),
        seq_len=32768,
        batch_size=8,
        grad_accum=8,
        lr=2e-4,
        remat="dots",
    )
