"""GRPO with LoRA on a small model: the CPU-sized rehearsal of qwen2_5_1_5b_grpo_lora.

Needs a starting model that already writes <answer>...</answer> (an SFT run on the walkthrough's
answers.jsonl) and the prompts with their answers:
  python docs/examples/preference_data.py data/arith
  python -m launch.train --recipe finetune_tiny --run-dir runs/arith_sft --set init.from=runs/stdlib_tiny \
      --set 'data.inputs=["data/arith/answers.jsonl"]' --set lora.rank=0
  python -m launch.train --recipe grpo_tiny --set init.from=runs/arith_sft
Runs in about two minutes on a 2-core CPU (docs/finetune.md).
"""

from recipes._finetune import arithmetic_grpo, preference_tiny


def recipe():
    return preference_tiny(
        "grpo_tiny",
        "GRPO with LoRA on prompt JSONL (data.inputs), rewards from docs/examples/rewards.py",
        "data/arith/prompts.jsonl",
        # iterations=2: two passes over each generation batch, twice the steps for one rollout's cost
        arithmetic_grpo(max_new_tokens=16, temperature=1.0, iterations=2),
        kind="grpo",
        # Adam moves each adapter weight by about lr a step, however faint the reward's signal. On the
        # e2e test's tiny model, 2e-2 broke the format within 10 steps and 3e-3 hardly moved the reward.
        lr=1e-2,
        warmup_steps=0,
        batch_size=64,
        log_every=2,
    )
