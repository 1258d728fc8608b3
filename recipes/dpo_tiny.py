"""DPO with LoRA on a small model: the CPU-sized rehearsal of llama3_2_1b_dpo_lora.

Needs a starting model and preference pairs, e.g. the demo's own model and the walkthrough's data:
  python docs/examples/preference_data.py data/arith
  python -m launch.train --recipe dpo_tiny --set init.from=runs/stdlib_tiny
Runs in about a minute on a 2-core CPU (docs/finetune.md).
"""

from lm.config import ObjectiveConfig
from recipes._finetune import preference_tiny


def recipe():
    return preference_tiny(
        "dpo_tiny",
        "DPO (sigmoid) with LoRA on preference JSONL (data.inputs) and a small model (init.from)",
        "data/arith/pairs.jsonl",
        ObjectiveConfig(beta=0.1, loss_type="sigmoid"),
        kind="dpo",
        lr=3e-3,
        warmup_steps=2,
    )
