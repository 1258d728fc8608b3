"""The embedded default: a ~1M-parameter Llama-style model on the Python standard library's source.

Trains in a few minutes on a 2-core CPU; on a GPU the same command runs unchanged.
"""

from lm.config import CheckpointConfig, DataConfig, OptimizerConfig, Recipe, TrainConfig, preset


def recipe() -> Recipe:
    return Recipe(
        name="stdlib_tiny",
        # remat=dots keeps the matmul outputs and recomputes the elementwise ops in the backward
        # pass: on a CPU that moves fewer bytes than saving everything, and the small benchmark
        # shape's step is 7-10% faster than with remat=none (docs/benchmarks.md).
        model=preset("stdlib_tiny", remat="dots"),
        data=DataConfig(inputs=(), eval_fraction=0.02),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, weight_decay=0.1),
        train=TrainConfig(steps=300, batch_size=16, seq_len=256, eval_every=100, log_every=10),
        checkpoint=CheckpointConfig(every=100, keep=3),
    )
