"""DPO of Llama 3.2 1B Instruct with LoRA rank 16, bfloat16 base, one 24 GB GPU (an L4 or an RTX 4090).
The reference is the base itself (adapters off): no second copy of the weights. Needs
--set init.from=DIR (huggingface-cli download meta-llama/Llama-3.2-1B-Instruct) and preference JSONL
(prompt, chosen, rejected; strings or message lists) in data.inputs.
"""

import dataclasses

from lm.config import LoraConfig, ObjectiveConfig
from recipes._finetune import finetune


def recipe():
    r = finetune(
        "llama3_2_1b_dpo_lora",
        "llama3_2_1b",
        "l4-24gb",
        "DPO (sigmoid, beta 0.1) with LoRA r16 of Llama 3.2 1B on preference JSONL, one 24 GB GPU",
        lora=LoraConfig(rank=16, alpha=32.0, base_dtype="bfloat16"),
        seq_len=1024,
        batch_size=8,  # pairs: 16 rows per step (chosen and rejected)
        grad_accum=1,
        lr=5e-5,  # LoRA DPO: TRL's examples use 5e-6 for full weights, ~10x for adapters
        remat="dots_no_batch",
    )
    return dataclasses.replace(
        r,
        data=dataclasses.replace(r.data, inputs=("data/preference.jsonl",)),
        train=dataclasses.replace(r.train, objective="dpo"),
        objective=ObjectiveConfig(beta=0.1, loss_type="sigmoid"),
    )
