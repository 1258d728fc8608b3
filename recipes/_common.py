"""Building blocks the recipes share: pretraining on prepared token files, and the Llama 3 and MoE TPU recipes."""

from dataclasses import replace

from lm.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MeshConfig,
    OptimizerConfig,
    Recipe,
    TrainConfig,
    preset,
)


def prepared(data_dir: str) -> DataConfig:
    """Token files written by `python -m launch.prepare --out DIR` (not needed to plan the recipe)."""
    return DataConfig(dir=data_dir, eval_fraction=0.005)


# Llama 3 pretraining as MaxText configures it: AdamW b2 0.95, weight decay 0.1, clip 1.0, cosine to 10%.
LLAMA_OPTIMIZER = OptimizerConfig(lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1, b2=0.95)


def llama3_tpu(
    model: str, hardware: str, per_device_batch: int, *, remat: str, tensor: int = 1, dcn_data: int = 1, steps: int
) -> Recipe:
    """Llama 3 pretraining on a TPU slice: FSDP over the slice, splash attention, 8192-token sequences;
    several slices replicate over DCN (mesh.dcn_data), so only the gradient all-reduce crosses it."""
    return Recipe(
        name=f"{model}_{hardware.replace('-', '_').replace(' x', '_x')}",
        hardware=hardware,
        description=(
            f"{model} pretraining on {hardware} (FSDP{f' + tensor {tensor}' if tensor > 1 else ''}"
            f"{f', {dcn_data} slices over DCN' if dcn_data > 1 else ''}); data: launch.prepare token files in "
            "data/pretrain (e.g. FineWeb shards) with a 128256-token tokenizer"
        ),
        model=preset(model, attention_impl="splash", remat=remat),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=tensor, dcn_data=dcn_data),
        data=prepared("data/pretrain"),
        optimizer=LLAMA_OPTIMIZER,
        train=TrainConfig(
            steps=steps,
            per_device_batch_size=per_device_batch,
            seq_len=8192,
            log_every=10,
            eval_every=1000,
            sample_prompt="The",
        ),
        checkpoint=CheckpointConfig(dir=None, every=1000, keep=3, keep_period=10_000),
        logging=LoggingConfig(wandb="online"),
    )


def gpt2_124m(hardware: str, grad_accum: int) -> Recipe:
    """nanoGPT / llm.c GPT-2 small: lr 6e-4 (cosine to 0 after llm.c's 700 warm-up steps), AdamW b2 0.95,
    weight decay 0.1, clip 1.0; 524,288 tokens per step; 19,073 steps = 10B tokens (llm.c's run)."""
    n_gpus = int(hardware.split(" x")[1]) if " x" in hardware else 1
    return Recipe(
        name="gpt2_124m" if n_gpus == 1 else f"gpt2_124m_{n_gpus}gpu",
        hardware=hardware,
        description=(
            "GPT-2 124M on launch.prepare token files in data/openwebtext (OpenWebText or FineWeb, vocab 50257); "
            "target val loss ~3.28 (llm.c, FineWeb, 10B tokens) to ~2.85 (nanoGPT, OpenWebText, 300B tokens)"
        ),
        model=preset("gpt2_124m", attention_impl="cudnn"),
        mesh=MeshConfig(data=-1, fsdp=1),
        data=prepared("data/openwebtext"),
        optimizer=OptimizerConfig(lr=6e-4, min_lr_ratio=0.0, warmup_steps=700, weight_decay=0.1, b2=0.95),
        train=TrainConfig(
            steps=19_073, batch_size=512, grad_accum=grad_accum, seq_len=1024, eval_every=250, sample_prompt="The"
        ),
        checkpoint=CheckpointConfig(every=1000, keep=3),
    )


def moe_tpu(model: str, hardware: str, per_device_batch: int, *, expert: int, remat: str, steps: int) -> Recipe:
    """Mixture-of-experts pretraining on a TPU slice: the experts split over mesh.expert (tokens reach
    them by all-to-all), every weight also split by FSDP over the rest, splash attention, 4096-token
    sequences."""
    recipe = llama3_tpu(model, hardware, per_device_batch, remat=remat, steps=steps)
    return replace(
        recipe,
        description=f"{model} pretraining on {hardware} (expert parallel {expert} x FSDP); data: launch.prepare "
        "token files in data/pretrain",
        mesh=MeshConfig(data=1, fsdp=-1, expert=expert),
        train=replace(recipe.train, seq_len=4096),
    )
