"""DPO with LoRA on a small model: the CPU-sized rehearsal of llama3_2_1b_dpo_lora.

Needs a starting model and preference pairs, e.g. the demo's own model and the walkthrough's data:
  python docs/examples/preference_data.py data/arith
  python -m launch.train --recipe dpo_tiny --set init.from=runs/stdlib_tiny
Runs in about a minute on a 2-core CPU (docs/finetune.md).
"""

import dataclasses

from lm.config import ObjectiveConfig
from recipes.finetune_tiny import recipe as finetune_tiny


def recipe():
    r = finetune_tiny()
    return dataclasses.replace(
        r,
        name="dpo_tiny",
        description="DPO (sigmoid) with LoRA on preference JSONL (data.inputs) and a small model (init.from)",
        data=dataclasses.replace(r.data, inputs=("data/arith/pairs.jsonl",)),
        optimizer=dataclasses.replace(r.optimizer, lr=3e-3, warmup_steps=2),
        train=dataclasses.replace(
            r.train, objective="dpo", steps=40, seq_len=32, log_every=5, sample_prompt="3 plus 4 ="
        ),
        checkpoint=dataclasses.replace(r.checkpoint, every=20),
        objective=ObjectiveConfig(beta=0.1, loss_type="sigmoid"),
    )
