"""Load a model for inference: a run of ours, a checkpoint, or a Hugging Face folder, sharded over a mesh."""

import base64
import dataclasses
import json
import pathlib
import tempfile

import jax
from flax import nnx

from lm.config import ModelConfig
from lm.data.tokenizer import Tokenizer, check_vocab, load_tokenizer
from lm.errors import UserError
from lm.model import Transformer
from lm.recipe import CheckpointConfig, MeshConfig, Recipe
from lm.train.checkpoint import Checkpointer, find_checkpoint
from sharding.mesh import make_mesh
from sharding.partition import check_divisible
from sharding.rules import logical_rules


@dataclasses.dataclass
class Loaded:
    """A model ready for inference, with what runs it: its tokenizer (None when not needed and absent),
    and the mesh and logical rules to trace it under."""

    name: str
    model: Transformer
    tokenizer: Tokenizer | None
    mesh: jax.sharding.Mesh
    rules: tuple


def inference_mesh(tensor: int = 1):
    """A mesh of `tensor` devices on the tensor axis: the batch is not split, weights are."""
    if not 1 <= tensor <= jax.device_count():
        raise UserError(f"--tensor={tensor} but there are {jax.device_count()} devices")
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=tensor), jax.devices()[:tensor])


def load_model(run_dir=None, checkpoint=None, hf=None, *, tensor: int = 1, need_tokenizer: bool = True) -> Loaded:
    """One of --run-dir, --checkpoint or --hf, loaded for generation or scoring."""
    if hf is not None:
        return load_hf_model(hf, tensor=tensor, need_tokenizer=need_tokenizer)
    recipe, model, tokenizer, mesh, rules = load_run(run_dir, checkpoint, tensor, need_tokenizer=need_tokenizer)
    return Loaded(recipe.name, model, tokenizer, mesh, rules)


def load_run(run_dir=None, checkpoint=None, tensor: int = 1, *, need_tokenizer: bool = True):
    """(recipe, model, tokenizer, mesh, rules) for --run-dir or --checkpoint.

    The run's tokenizer is whatever its folder holds: our tokenizer.model, or the Hugging Face files a
    converted run carries (tokenizer.json, tokenizer_config.json, ...). tensor > 1 shards heads, kv
    heads, MLP and vocab over that many devices, for a model too large for one device.
    """
    folder, step, run = find_checkpoint(run_dir, checkpoint)
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False))
    try:
        meta = ckpt.meta(step)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign folder
        raise UserError(
            f"checkpoint {step} in {folder} is unreadable ({type(e).__name__}); pass an earlier one with --checkpoint"
        ) from None
    # The checkpoint carries its recipe (and our tokenizer); the run folder's copies are the fallback.
    recipe = (
        Recipe.from_dict(meta["recipe"])
        if "recipe" in meta
        else Recipe.from_dict(json.loads((run / "recipe.json").read_text()))
    )
    recipe = dataclasses.replace(recipe, model=for_this_platform(recipe.model))
    tokenizer = _run_tokenizer(run, meta, step) if need_tokenizer or _has_tokenizer(run) else None
    if tokenizer is not None:
        check_vocab(tokenizer, recipe.model.vocab_size, f"checkpoint {folder / str(step)}")
    mesh_ = inference_mesh(tensor)
    rules = logical_rules(recipe.mesh.rules)
    check_divisible(recipe.model.logical_dims(), mesh_, rules)
    ckpt.close()
    from lm.train.init import load_trained  # a LoRA run: its base (init.from) plus its adapters, unmerged

    with jax.set_mesh(mesh_), nnx.logical_axis_rules(rules):
        try:
            model = load_trained(recipe, folder, step, mesh_, rules)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - shape mismatch, missing or truncated arrays
            raise UserError(
                f"checkpoint {folder / str(step)} does not match the model in {run / 'recipe.json'}: "
                f"{str(e).splitlines()[0][:200]}"
            ) from None
    return recipe, model, tokenizer, mesh_, rules


def for_this_platform(cfg: ModelConfig) -> ModelConfig:
    """The attention kernel is an execution option of the run's own hardware: a checkpoint trained
    with splash on a TPU (or cuDNN on a GPU) generates anywhere with the kernel this platform has."""
    needs = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
    if cfg.attention_impl in needs and jax.default_backend() not in needs[cfg.attention_impl]:
        return dataclasses.replace(cfg, attention_impl="auto")
    return cfg


def _has_tokenizer(folder: pathlib.Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))


def _run_tokenizer(run: pathlib.Path, meta: dict, step: int) -> Tokenizer:
    if not _has_tokenizer(run) and "tokenizer_model" in meta:
        # Our runs embed their sentencepiece model in the checkpoint, so a copied checkpoint still decodes.
        path = pathlib.Path(tempfile.mkdtemp()) / "tokenizer.model"
        path.write_bytes(base64.b64decode(meta["tokenizer_model"]))
        return load_tokenizer(path)
    if not _has_tokenizer(run):
        raise UserError(
            f"{run} has no tokenizer (tokenizer.model or tokenizer.json); copy the tokenizer the run was trained "
            "with there"
        )
    tokenizer = load_tokenizer(run)
    if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise UserError(
            f"{tokenizer.path} is not the tokenizer checkpoint {step} was trained with (sha256 differs); "
            "restore the run's own tokenizer files"
        )
    return tokenizer


def load_hf_model(folder, *, tensor: int = 1, need_tokenizer: bool = True, scan_layers: bool = True) -> Loaded:
    """A Hugging Face model folder (config.json + safetensors [+ tokenizer files]) as our Transformer.

    need_tokenizer=False accepts a folder with only config.json and the weights (scoring token ids).
    """
    from lm.hf import load_hf

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise UserError(f"--hf {folder} is not a folder; pass a Hugging Face model folder (config.json + weights)")
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{folder} is not a Hugging Face model folder (no config.json); download one with "
            "`huggingface-cli download <repo> --local-dir DIR` or export a run with launch.convert --hf-out"
        )
    tokenizer = load_tokenizer(folder) if need_tokenizer or _has_tokenizer(folder) else None
    mesh_ = inference_mesh(tensor)
    rules = logical_rules()
    with jax.set_mesh(mesh_), nnx.logical_axis_rules(rules):
        model = load_hf(folder, scan_layers=scan_layers, mesh=mesh_, rules=rules)
    if tokenizer is not None:
        check_vocab(tokenizer, model.cfg.vocab_size, str(folder))
    return Loaded(folder.name, model, tokenizer, mesh_, rules)
