"""GRPO with LoRA on a small model: the CPU-sized rehearsal of qwen2_5_1_5b_grpo_lora.

Needs a starting model that already writes <answer>...</answer> (an SFT run on the walkthrough's
answers.jsonl) and the prompts with their answers:
  python docs/examples/preference_data.py data/arith
  python -m launch.train --recipe finetune_tiny --run-dir runs/arith_sft --set init.from=runs/stdlib_tiny \
      --set 'data.inputs=["data/arith/answers.jsonl"]' --set lora.rank=0
  python -m launch.train --recipe grpo_tiny --set init.from=runs/arith_sft
Runs in about two minutes on a 2-core CPU (docs/finetune.md).
"""

import dataclasses

from lm.config import ObjectiveConfig
from recipes.finetune_tiny import recipe as finetune_tiny


def recipe():
    r = finetune_tiny()
    return dataclasses.replace(
        r,
        name="grpo_tiny",
        description="GRPO with LoRA on prompt JSONL (data.inputs), rewards from docs/examples/rewards.py",
        data=dataclasses.replace(r.data, inputs=("data/arith/prompts.jsonl",)),
        # Adam moves each adapter weight by about lr a step, however faint the reward's signal. On the
        # e2e test's tiny model, 2e-2 broke the format within 10 steps and 3e-3 hardly moved the reward.
        optimizer=dataclasses.replace(r.optimizer, lr=1e-2, warmup_steps=0),
        train=dataclasses.replace(
            r.train, objective="grpo", steps=40, batch_size=64, seq_len=32, log_every=2, sample_prompt="3 plus 4 ="
        ),
        checkpoint=dataclasses.replace(r.checkpoint, every=20),
        objective=ObjectiveConfig(
            rewards=("docs/examples/rewards.py:exact_answer", "docs/examples/rewards.py:tagged"),
            beta=0.04,
            group_size=8,  # 8 prompts a generation batch
            max_new_tokens=16,
            temperature=1.0,
            iterations=2,  # two passes over each generation batch: twice the steps for one rollout's cost
        ),
    )
