"""GRPO of Qwen2.5 1.5B Instruct with LoRA rank 16, bfloat16 base, one 24 GB GPU (an L4 or an RTX 4090):
8 completions per prompt sampled by nnx-lm's decode loop on the live adapters, rewards from
objective.rewards. Needs --set init.from=DIR (huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct),
prompt JSONL (prompt or messages, and the `answer` field docs/examples/rewards.py:exact_answer reads) in
data.inputs; other rewards with --set 'objective.rewards=["FILE.py:FUNCTION"]'.
"""

import dataclasses

from lm.config import LoraConfig
from recipes._finetune import arithmetic_grpo, finetune


def recipe():
    r = finetune(
        "qwen2_5_1_5b_grpo_lora",
        "qwen2_5_1_5b",
        "l4-24gb",
        "GRPO with LoRA r16 of Qwen2.5 1.5B on prompt JSONL and reward functions, one 24 GB GPU",
        lora=LoraConfig(rank=16, alpha=32.0, base_dtype="bfloat16"),
        seq_len=768,  # prompt + objective.max_new_tokens
        batch_size=32,  # completions per generation batch: 4 prompts x 8
        grad_accum=1,
        lr=1e-5,
        remat="full",
    )
    return dataclasses.replace(
        r,
        data=dataclasses.replace(r.data, inputs=("data/prompts.jsonl",)),
        train=dataclasses.replace(r.train, objective="grpo", sample_prompt="What is 12 plus 30?"),
        checkpoint=dataclasses.replace(r.checkpoint, every=100),
        objective=arithmetic_grpo(max_new_tokens=512, temperature=1.0),
    )
