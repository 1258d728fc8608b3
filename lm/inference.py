"""Load a trained run for inference: recipe, tokenizer and parameters, sharded over a mesh."""

import base64
import json
import pathlib
import tempfile

import jax
from flax import nnx

from lm.data import Tokenizer
from lm.data.prepare import file_sha256
from lm.errors import UserError
from lm.model import Transformer
from lm.recipe import CheckpointConfig, MeshConfig, Recipe
from lm.train.checkpoint import Checkpointer, find_checkpoint
from sharding.mesh import make_mesh
from sharding.partition import check_divisible, create_sharded
from sharding.rules import logical_rules


def load_run(run_dir=None, checkpoint=None, tensor: int = 1):
    """(recipe, model, tokenizer, mesh, rules) for --run-dir or --checkpoint.

    tensor > 1 shards heads, kv heads, MLP and vocab over that many devices (tensor parallelism),
    for a model too large for one device; the batch is not split.
    """
    folder, step, run = find_checkpoint(run_dir, checkpoint)
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False))
    try:
        meta = ckpt.meta(step)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign folder
        raise UserError(
            f"checkpoint {step} in {folder} is unreadable ({type(e).__name__}); pass an earlier one with --checkpoint"
        ) from None
    # The checkpoint carries its recipe and tokenizer; the run folder's copies are the fallback.
    recipe = (
        Recipe.from_dict(meta["recipe"])
        if "recipe" in meta
        else Recipe.from_dict(json.loads((run / "recipe.json").read_text()))
    )
    tokenizer_path = run / "tokenizer.model"
    if "tokenizer_model" in meta and not tokenizer_path.is_file():
        tokenizer_path = pathlib.Path(tempfile.mkdtemp()) / "tokenizer.model"
        tokenizer_path.write_bytes(base64.b64decode(meta["tokenizer_model"]))
    if not tokenizer_path.is_file():
        raise UserError(f"{run} has no tokenizer.model; copy the tokenizer the run was trained with there")
    if meta.get("tokenizer_sha256") not in (None, file_sha256(tokenizer_path)):
        raise UserError(
            f"{tokenizer_path} is not the tokenizer checkpoint {step} was trained with (sha256 differs); "
            "restore the run's own tokenizer.model"
        )
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the checkpoint's model "
            f"has vocab_size={recipe.model.vocab_size}; use the tokenizer the run was trained with"
        )
    if not 1 <= tensor <= jax.device_count():
        raise UserError(f"--tensor={tensor} but there are {jax.device_count()} devices")
    mesh_ = make_mesh(MeshConfig(data=1, fsdp=1, tensor=tensor), jax.devices()[:tensor])
    rules = logical_rules(recipe.mesh.rules)
    check_divisible(recipe.model.logical_dims(), mesh_, rules)
    with jax.set_mesh(mesh_), nnx.logical_axis_rules(rules):
        model = create_sharded(lambda: Transformer(recipe.model, rngs=nnx.Rngs(0)), mesh_, rules)
        try:
            ckpt.restore_params(step, model)
        except Exception as e:  # noqa: BLE001 - shape mismatch, missing or truncated arrays
            raise UserError(
                f"checkpoint {folder / str(step)} does not match the model in {run / 'recipe.json'}: "
                f"{str(e).splitlines()[0][:200]}"
            ) from None
        finally:
            ckpt.close()
    return recipe, model, tokenizer, mesh_, rules
