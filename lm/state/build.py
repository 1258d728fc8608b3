"""Building a run's model and optimizer on a mesh: a random init, or init.from (lm.state.source),
with LoRA adapters on top when `lora.rank > 0`. Every path builds the parameters directly sharded."""

import dataclasses

from flax import nnx

from lm import lora
from lm.config import CheckpointConfig, Recipe
from lm.hf import load_hf
from lm.model import Transformer
from lm.state.checkpoint import Checkpointer
from lm.state.optimizer import make_optimizer
from lm.state.source import InitSource, find_source
from sharding.mesh import Layout
from sharding.partition import create_sharded, place


def _load_hf(source: InitSource, recipe: Recipe, layout: Layout) -> nnx.Module:
    """The HF weights in a model built from the recipe's model section (its execution options). A
    LoRA base that will be stored in bfloat16 or quantised is read as bfloat16, never widened."""
    cfg = recipe.model
    narrow = recipe.lora.rank and recipe.lora.base_dtype != "float32"
    param_dtype = "bfloat16" if narrow else cfg.param_dtype
    loaded = load_hf(source.path, scan_layers=cfg.scan_layers, dtype=cfg.dtype, param_dtype=param_dtype, layout=layout)
    with layout:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(loaded))


def load_trained(recipe: Recipe, folder, step: int, layout: Layout) -> nnx.Module:
    """The model a run's checkpoint describes: its parameters, or for a LoRA run its base
    (rebuilt from its own init.from) with the saved adapters, not merged."""
    if recipe.lora.rank:
        model = base_model(recipe, layout, find_source(recipe.init.from_) if recipe.init.from_ else None)
        with layout:
            apply_lora(model, recipe)
    else:
        model = create_sharded(lambda: Transformer(recipe.model, rngs=nnx.Rngs(0)), layout)
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False))
    try:
        ckpt.restore_params(step, model)
    finally:
        ckpt.close()
    return model


def base_model(recipe: Recipe, layout: Layout, source: InitSource | None) -> nnx.Module:
    """The starting weights, before any adapter: random, an HF import, or another run's checkpoint
    (a LoRA run's adapters merged into its base)."""
    if source is None:
        return create_sharded(lambda: Transformer(recipe.model, rngs=nnx.Rngs(params=recipe.train.seed)), layout)
    if source.hf:
        return _load_hf(source, recipe, layout)
    theirs = dataclasses.replace(source.recipe, model=source.recipe.model.with_execution_of(recipe.model))
    model = load_trained(theirs, source.folder, source.step, layout)
    if theirs.lora.rank:
        lora.merge(model)
    return model


def apply_lora(model: nnx.Module, recipe: Recipe) -> list[str]:
    """Add adapters (lm.lora) and place them, and any quantised base weights, by their logical names."""
    paths = lora.apply(model, recipe.lora, seed=recipe.train.seed)
    nnx.update(model, place(nnx.state(model, nnx.Any(nnx.LoRAParam, lora.Quantized, lora.DropoutSalt))))
    return paths


def build(recipe: Recipe, layout: Layout, source: InitSource | None = None) -> tuple[nnx.Module, nnx.Optimizer]:
    """Model and optimizer for training, under `layout` (entered by the caller). The optimizer holds
    only what trains: every Param for a full (fine-)tune, only the nnx.LoRAParam adapters for LoRA."""
    t = recipe.train
    if source is None and not recipe.lora.rank:
        # Model and Adam state built together, directly sharded (no full copy on any device).
        def make():
            model = Transformer(recipe.model, rngs=nnx.Rngs(params=t.seed))
            return model, make_optimizer(model, recipe.optimizer, t.steps, t.max_bad_steps)

        return create_sharded(make, layout)
    model = base_model(recipe, layout, source)
    wrt = nnx.LoRAParam if recipe.lora.rank else nnx.Param
    if recipe.lora.rank:
        apply_lora(model, recipe)
    return model, make_optimizer(model, recipe.optimizer, t.steps, t.max_bad_steps, wrt=wrt)
