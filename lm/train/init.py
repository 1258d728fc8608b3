"""A run's starting weights: a random init, or `init.from` (a Hugging Face folder, a run directory or
a checkpoint step), with LoRA adapters on top when `lora.rank > 0`.

With init.from the model section comes from the source (see `resolve`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import jax
from flax import nnx

from lm.config import ModelConfig
from lm.errors import UserError
from lm.model import Transformer
from lm.recipe import CheckpointConfig, Recipe
from lm.train.checkpoint import Checkpointer, find_checkpoint
from lm.train.optimizer import make_optimizer
from sharding.partition import create_sharded, place

EXECUTION = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where init.from points: an HF folder, or a checkpoint step of one of our runs."""

    path: pathlib.Path
    hf: bool
    step: int | None = None
    folder: pathlib.Path | None = None  # the checkpoints folder
    recipe: Recipe | None = None  # the source run's resolved recipe

    @property
    def weights(self) -> pathlib.Path:
        """The files whose bytes are the base: the HF folder or the checkpoint step folder."""
        return self.path if self.hf else self.folder / str(self.step)


def find_source(path: str) -> Source:
    p = pathlib.Path(path).expanduser().absolute()
    if not p.exists():
        raise UserError(
            f"init.from={path} does not exist; pass a Hugging Face folder (config.json + *.safetensors), "
            "a run directory or a checkpoint step folder"
        )
    if (p / "config.json").is_file():
        return Source(p, hf=True)
    if p.name.isdigit() or p.name == "checkpoints":
        folder, step, run = find_checkpoint(checkpoint=p)
    elif (p / "recipe.json").is_file():
        folder, step, run = find_checkpoint(run_dir=p)
    else:
        raise UserError(
            f"init.from={path} is neither a Hugging Face folder (no config.json) nor a run directory "
            "(no recipe.json) nor a checkpoint step folder"
        )
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False))
    try:
        meta = ckpt.meta(step)
    finally:
        ckpt.close()
    saved = meta.get("recipe") or json.loads((run / "recipe.json").read_text())
    return Source(p, hf=False, step=step, folder=folder, recipe=Recipe.from_dict(saved))


def source_model(src: Source) -> ModelConfig:
    if src.hf:
        from lm.hf import config_from_hf

        return config_from_hf(src.path)
    return src.recipe.model


def resolve(recipe: Recipe, overrides: list[str] = ()) -> Recipe:
    """The recipe with its model section read from init.from (unchanged without init.from).

    The recipe file's own model section (a preset, which launch.plan uses before any download) gives
    way to the source's. A `model.*` override (`--set model.n_layers=3`) that disagrees with the
    source is refused; the execution options (dtype, remat, scan, attention kernel) are the recipe's.
    """
    if not recipe.init.from_:
        return recipe
    theirs = source_model(find_source(recipe.init.from_))
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("model.") or key[len("model.") :] in EXECUTION:
            continue
        name = key[len("model.") :]
        if getattr(recipe.model, name) != getattr(theirs, name):
            raise UserError(
                f"{key}={getattr(recipe.model, name)!r} conflicts with init.from={recipe.init.from_}, whose model has "
                f"{name}={getattr(theirs, name)!r}; the model comes from init.from, so drop --set {key}"
            )
    model = dataclasses.replace(theirs, **{k: getattr(recipe.model, k) for k in EXECUTION})
    return dataclasses.replace(recipe, model=model)


def source_tokenizer(recipe: Recipe) -> str | None:
    """The tokenizer init.from comes with: an HF folder's files, or a run's tokenizer.model."""
    if not recipe.init.from_:
        return None
    src = find_source(recipe.init.from_)
    if src.hf:
        has = any((src.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        return str(src.path) if has else None
    run = src.folder.parent
    return str(run / "tokenizer.model") if (run / "tokenizer.model").is_file() else str(run)


def fingerprint(path: pathlib.Path) -> str:
    """sha256 over every file's relative name, size and first and last MiB: identifies a base of many
    GB in well under a second (a full hash of an 8B model would cost half a minute per start)."""
    digest = hashlib.sha256()
    files = sorted(f for f in pathlib.Path(path).rglob("*") if f.is_file())
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                digest.update(fh.read())
    return digest.hexdigest()


def base_identity(recipe: Recipe) -> dict | None:
    """What a LoRA checkpoint stores in place of the base: its path and fingerprint."""
    if not recipe.init.from_:
        return None
    src = find_source(recipe.init.from_)
    return {"from": str(src.path), "weights": str(src.weights), "fingerprint": fingerprint(src.weights)}


def _load_hf(src: Source, recipe: Recipe, mesh, rules) -> nnx.Module:
    """The HF weights in a model built from the recipe's model section (its execution options). A
    LoRA base that will be stored in bfloat16 or quantised is read as bfloat16, never widened."""
    from lm.hf import load_hf

    cfg = recipe.model
    narrow = recipe.lora.rank and recipe.lora.base_dtype != "float32"
    param_dtype = "bfloat16" if narrow else cfg.param_dtype
    loaded = load_hf(
        src.path, scan_layers=cfg.scan_layers, dtype=cfg.dtype, param_dtype=param_dtype, mesh=mesh, rules=rules
    )
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(loaded))


def load_trained(recipe: Recipe, folder, step: int, mesh, rules) -> nnx.Module:
    """The model a run's checkpoint describes: its parameters, or for a LoRA run its base
    (rebuilt from its own init.from) with the saved adapters, not merged."""
    if recipe.lora.rank:
        model = base_model(recipe, mesh, rules)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            apply_lora(model, recipe)
    else:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            model = create_sharded(lambda: Transformer(recipe.model, rngs=nnx.Rngs(0)), mesh, rules)
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False))
    try:
        ckpt.restore_params(step, model)
    finally:
        ckpt.close()
    return model


def base_model(recipe: Recipe, mesh, rules) -> nnx.Module:
    """The starting weights, before any adapter: random, an HF import, or another run's checkpoint
    (a LoRA run's adapters merged into its base)."""
    cfg = recipe.model
    if not recipe.init.from_:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(params=recipe.train.seed)), mesh, rules)
    src = find_source(recipe.init.from_)
    if src.hf:
        return _load_hf(src, recipe, mesh, rules)
    theirs = dataclasses.replace(src.recipe, model=dataclasses.replace(src.recipe.model, **_execution(cfg)))
    model = load_trained(theirs, src.folder, src.step, mesh, rules)
    if theirs.lora.rank:
        from lm import lora

        lora.merge(model)
    return model


def _execution(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in EXECUTION}


def apply_lora(model: nnx.Module, recipe: Recipe) -> list[str]:
    """Add adapters (lm.lora) and place them, and any quantised base weights, by their logical names."""
    from lm import lora

    c = recipe.lora
    spec = lora.LoraSpec(rank=c.rank, alpha=c.alpha, targets=c.targets, base_dtype=c.base_dtype, dropout=c.dropout)
    paths = lora.apply(model, spec, seed=recipe.train.seed)
    nnx.update(model, place(nnx.state(model, nnx.Any(nnx.LoRAParam, lora.Quantized, lora.DropoutSalt))))
    return paths


def build(recipe: Recipe, mesh, rules) -> tuple[nnx.Module, nnx.Optimizer]:
    """Model and optimizer for training. The optimizer holds only what trains: every Param for a
    full (fine-)tune, only the nnx.LoRAParam adapters for a LoRA run."""
    t = recipe.train
    if not recipe.init.from_ and not recipe.lora.rank:
        # Model and Adam state built together, directly sharded (no full copy on any device).
        def make():
            model = Transformer(recipe.model, rngs=nnx.Rngs(params=t.seed))
            return model, make_optimizer(model, recipe.optimizer, t.steps, t.max_bad_steps)

        return create_sharded(make, mesh, rules)
    model = base_model(recipe, mesh, rules)
    wrt = nnx.Param
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        if recipe.lora.rank:
            apply_lora(model, recipe)
            wrt = nnx.LoRAParam
        optimizer = make_optimizer(model, recipe.optimizer, t.steps, t.max_bad_steps, wrt=wrt)
    return model, optimizer
