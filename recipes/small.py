"""The benchmarks' 'small' config: 6 layers, width 384, 6 heads, vocab 8192 (about 20M parameters)."""

from lm.config import DataConfig, OptimizerConfig, Recipe, TrainConfig, preset


def recipe() -> Recipe:
    return Recipe(
        name="small",
        model=preset("small"),
        data=DataConfig(inputs=()),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=100),
        train=TrainConfig(steps=2000, batch_size=32, seq_len=512, eval_every=250),
    )
