"""Single-GPU fine-tuning recipes: a pretrained model (init.from, required), chat or instruction JSONL,
LoRA/QLoRA or a full fine-tune. The model presets are there so that launch.plan can size a recipe
before anything is downloaded; with init.from the model section comes from the checkpoint itself."""

from lm.config import (
    CheckpointConfig,
    DataConfig,
    InitConfig,
    LoggingConfig,
    LoraConfig,
    OptimizerConfig,
    Recipe,
    TrainConfig,
    preset,
)


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
