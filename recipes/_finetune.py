"""Single-GPU fine-tuning recipes: a pretrained model (init.from, required), chat or instruction JSONL,
LoRA/QLoRA or a full fine-tune. The model presets are there so that launch.plan can size a recipe
before anything is downloaded; with init.from the model section comes from the checkpoint itself."""

import dataclasses

from lm.config import (
    CheckpointConfig,
    DataConfig,
    InitConfig,
    LoggingConfig,
    LoraConfig,
    ObjectiveConfig,
    OptimizerConfig,
    Recipe,
    TrainConfig,
    preset,
)
from recipes.finetune_tiny import recipe as finetune_tiny


def finetune(
    name: str,
    model: str,
    hardware: str,
    description: str,
    *,
    lora: LoraConfig,
    seq_len: int,
    batch_size: int,
    grad_accum: int,
    lr: float,
    remat: str,
    steps: int = 1000,
) -> Recipe:
    return Recipe(
        name=name,
        hardware=hardware,
        description=description,
        init=InitConfig(required=True),
        lora=lora,
        model=preset(model, remat=remat, attention_impl="cudnn", dtype="bfloat16"),
        data=DataConfig(inputs=("data/chat.jsonl",), format="auto", eval_fraction=0.02),
        # The usual LoRA / SFT settings (PEFT and TRL examples): no weight decay on adapters, short warm-up.
        optimizer=OptimizerConfig(lr=lr, min_lr_ratio=0.1, warmup_steps=30, weight_decay=0.0, b2=0.999),
        train=TrainConfig(
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seq_len=seq_len,
            log_every=10,
            eval_every=200,
            eval_batches=8,
            sample_prompt="Hello",
        ),
        checkpoint=CheckpointConfig(every=200, keep=2),
        logging=LoggingConfig(wandb="offline"),
    )


def arithmetic_grpo(**settings) -> ObjectiveConfig:
    """GRPO on the walkthrough's arithmetic prompts (docs/examples/preference_data.py): the answer and
    the <answer> format rewarded (docs/examples/rewards.py), 8 completions per prompt."""
    rewards = ("docs/examples/rewards.py:exact_answer", "docs/examples/rewards.py:tagged")
    return ObjectiveConfig(rewards=rewards, beta=0.04, group_size=8, **settings)


def preference_tiny(
    name: str, description: str, inputs: str, objective: ObjectiveConfig, *, kind: str, lr: float, warmup_steps: int,
    **train,
) -> Recipe:  # fmt: skip
    """dpo_tiny and grpo_tiny: finetune_tiny's LoRA on the walkthrough's arithmetic data, 40 steps of
    32 tokens, a checkpoint every 20."""
    r = finetune_tiny()
    return dataclasses.replace(
        r,
        name=name,
        description=description,
        data=dataclasses.replace(r.data, inputs=(inputs,)),
        optimizer=dataclasses.replace(r.optimizer, lr=lr, warmup_steps=warmup_steps),
        train=dataclasses.replace(
            r.train,
            **{"objective": kind, "steps": 40, "seq_len": 32, "log_every": 5, "sample_prompt": "3 plus 4 =", **train},
        ),
        checkpoint=dataclasses.replace(r.checkpoint, every=20),
        objective=objective,
    )
