"""LoRA fine-tuning of a small model on chat or instruction JSONL: the CPU-sized rehearsal of the GPU recipes.

Needs a starting model and data, e.g. the demo's own model and a chat file:
  python -m launch.train --recipe finetune_tiny --set init.from=runs/stdlib_tiny --set data.inputs='["chat.jsonl"]'
Runs in about a minute on a 2-core CPU (docs/finetune.md).
"""

from lm.config import (
    CheckpointConfig,
    DataConfig,
    InitConfig,
    LoggingConfig,
    LoraConfig,
    OptimizerConfig,
    Recipe,
    TrainConfig,
)


def recipe() -> Recipe:
    return Recipe(
        name="finetune_tiny",
        hardware="cpu",
        description="a chat or instruction JSONL (data.inputs) on a small model the user or the tests make",
        init=InitConfig(required=True),  # the model section comes from init.from
        lora=LoraConfig(rank=8, alpha=16.0, base_dtype="float32"),  # float32: CPU matmuls in bf16 are slow
        data=DataConfig(format="auto", eval_fraction=0.1),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0, min_lr_ratio=0.1),
        train=TrainConfig(
            steps=60, batch_size=8, seq_len=128, log_every=5, eval_every=20, eval_batches=2, sample_tokens=32
        ),
        checkpoint=CheckpointConfig(every=20, keep=2),
        logging=LoggingConfig(wandb="disabled"),
    )
