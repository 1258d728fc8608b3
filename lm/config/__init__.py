"""What a run is, as typed values: the model's architecture (ModelConfig), named presets, and the
recipe's sections with their `--set` overrides. Nothing here reads checkpoints or starts devices."""

from lm.config.model import EXECUTION, STORED, ModelConfig
from lm.config.presets import PRESETS, preset
from lm.config.recipe import (
    SAFE_TO_CHANGE,
    CheckpointConfig,
    DataConfig,
    InitConfig,
    LoggingConfig,
    LoraConfig,
    MeshConfig,
    ObjectiveConfig,
    OptimizerConfig,
    Recipe,
    TrainConfig,
    all_keys,
    apply_overrides,
    available_recipes,
    diff_recipes,
    load_recipe,
)
