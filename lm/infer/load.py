"""Load a model for inference: a run of ours, a checkpoint, or a Hugging Face folder, sharded over a mesh."""

import base64
import dataclasses
import pathlib
import tempfile

import jax

from lm.config import MeshConfig, Recipe
from lm.data.tokenizer import Tokenizer, check_vocab, load_tokenizer
from lm.errors import UserError
from lm.hf import load_hf
from lm.kernels import for_platform
from lm.model import Transformer
from lm.state.build import base_model, load_trained
from lm.state.checkpoint import CheckpointMeta, find_checkpoint, read_meta
from lm.state.source import check_base, find_source
from sharding.mesh import Layout
from sharding.partition import check_divisible


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loaded:
    """A model ready for inference, with what runs it: its tokenizer (None when not needed and absent),
    the layout to trace it under, and for one of our runs its recipe and checkpoint step."""

    name: str
    model: Transformer
    tokenizer: Tokenizer | None
    layout: Layout
    recipe: Recipe | None = None
    run: pathlib.Path | None = None
    step: int | None = None


def inference_layout(tensor: int = 1, rules=(), fsdp: int = 1, context: int = 1) -> Layout:
    """One process: `tensor` x `fsdp` x `context` of its devices; the batch is split over fsdp (batches
    must then divide by it), the weights over fsdp and tensor, and each sequence over context (context
    parallelism: mesh.context's `length` rule, for scoring and prefill). Several processes: every device
    of every process, `tensor` and `context` as given and the rest on fsdp, so a model too large for one
    host is split over all of them (each process holds its part of the weights)."""
    n = jax.device_count()
    if context < 1 or context * tensor > n:
        raise UserError(f"--context={context} must be in [1, {n // max(tensor, 1)}]: {n} devices, --tensor={tensor}")
    if tensor < 1 or fsdp < 1 or tensor * fsdp * context > n:
        raise UserError(f"--tensor={tensor} x --fsdp={fsdp} x --context={context} devices but there are {n} devices")
    if jax.process_count() == 1:
        mesh = MeshConfig(data=1, fsdp=fsdp, context=context, tensor=tensor, rules=tuple(rules))
        return Layout.build(mesh, jax.devices()[: tensor * fsdp * context])
    if n % (tensor * context):
        raise UserError(
            f"--tensor={tensor} x --context={context} does not divide the {n} devices of the "
            f"{jax.process_count()} processes"
        )
    fsdp = n // (tensor * context)
    return Layout.build(MeshConfig(data=1, fsdp=fsdp, context=context, tensor=tensor, rules=tuple(rules)))


def load_model(
    run_dir=None, checkpoint=None, hf=None, *, tensor: int = 1, fsdp: int = 1, context: int = 1,
    need_tokenizer: bool = True,
) -> Loaded:  # fmt: skip
    """One of --run-dir, --checkpoint or --hf, loaded for generation or scoring (see inference_layout)."""
    if hf is not None:
        return load_hf_model(hf, tensor=tensor, fsdp=fsdp, context=context, need_tokenizer=need_tokenizer)
    return load_run(run_dir, checkpoint, tensor, fsdp=fsdp, context=context, need_tokenizer=need_tokenizer)


def load_run(
    run_dir=None, checkpoint=None, tensor: int = 1, *, fsdp: int = 1, context: int = 1, need_tokenizer: bool = True
) -> Loaded:
    """--run-dir or --checkpoint: the run's model (a LoRA run: its base plus its adapters, unmerged).

    The run's tokenizer is whatever its folder holds: our tokenizer.model, or the Hugging Face files a
    converted run carries (tokenizer.json, tokenizer_config.json, ...). tensor > 1 shards heads, kv
    heads, MLP and vocab over that many devices, for a model too large for one device.
    """
    folder, step, run = find_checkpoint(run_dir, checkpoint)
    meta = read_meta(folder, step, run)
    # The checkpoint carries its recipe (and our tokenizer); the run folder's copies are the fallback.
    recipe = meta.run_recipe(run)
    model_cfg = dataclasses.replace(recipe.model, attention_impl=for_platform(recipe.model.attention_impl))
    recipe = dataclasses.replace(recipe, model=model_cfg)
    tokenizer = _run_tokenizer(run, meta, step) if need_tokenizer or _has_tokenizer(run) else None
    if tokenizer is not None:
        check_vocab(tokenizer, recipe.model.vocab_size, f"checkpoint {folder / str(step)}")
    if recipe.lora.rank and recipe.init.from_:  # the adapter goes onto the base it was trained on, or nowhere
        check_base(meta.base, find_source(recipe.init.from_), f"checkpoint {folder / str(step)}")
    layout = inference_layout(tensor, recipe.mesh.rules, fsdp, context)
    check_divisible(recipe.model.logical_dims(), layout)
    with layout:
        try:
            model = load_trained(recipe, folder, step, layout)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - shape mismatch, missing or truncated arrays
            raise UserError(
                f"checkpoint {folder / str(step)} does not match the model in {run / 'recipe.json'}: "
                f"{str(e).splitlines()[0][:200]}"
            ) from None
    return Loaded(name=recipe.name, model=model, tokenizer=tokenizer, layout=layout, recipe=recipe, run=run, step=step)


def merge_base(recipe: Recipe, layout: Layout):
    """A LoRA run's base as init.from holds it, in its own dtype (not the run's quantised or bfloat16
    copy): what a merged export folds the adapters into. Call under the layout."""
    plain = dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, rank=0))
    return base_model(plain, layout, find_source(recipe.init.from_) if recipe.init.from_ else None)


def _has_tokenizer(folder: pathlib.Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))


def _run_tokenizer(run: pathlib.Path, meta: CheckpointMeta, step: int) -> Tokenizer:
    if not _has_tokenizer(run) and meta.tokenizer_model:
        # Our runs embed their sentencepiece model in the checkpoint, so a copied checkpoint still decodes.
        path = pathlib.Path(tempfile.mkdtemp()) / "tokenizer.model"
        path.write_bytes(base64.b64decode(meta.tokenizer_model))
        return load_tokenizer(path)
    if not _has_tokenizer(run):
        raise UserError(
            f"{run} has no tokenizer (tokenizer.model or tokenizer.json); copy the tokenizer the run was trained "
            "with there"
        )
    tokenizer = load_tokenizer(run)
    if meta.tokenizer_sha256 not in (None, tokenizer.sha256):
        raise UserError(
            f"{tokenizer.path} is not the tokenizer checkpoint {step} was trained with (sha256 differs); "
            "restore the run's own tokenizer files"
        )
    return tokenizer


def load_hf_model(
    folder, *, tensor: int = 1, fsdp: int = 1, context: int = 1, need_tokenizer: bool = True, scan_layers: bool = True
) -> Loaded:
    """A Hugging Face model folder (config.json + safetensors [+ tokenizer files]) as our Transformer.

    need_tokenizer=False accepts a folder with only config.json and the weights (scoring token ids).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise UserError(f"--hf {folder} is not a folder; pass a Hugging Face model folder (config.json + weights)")
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{folder} is not a Hugging Face model folder (no config.json); download one with "
            "`huggingface-cli download <repo> --local-dir DIR` or export a run with launch.convert --hf-out"
        )
    tokenizer = load_tokenizer(folder) if need_tokenizer or _has_tokenizer(folder) else None
    layout = inference_layout(tensor, fsdp=fsdp, context=context)
    model = load_hf(folder, scan_layers=scan_layers, layout=layout)
    if tokenizer is not None:
        check_vocab(tokenizer, model.cfg.vocab_size, str(folder))
    return Loaded(name=folder.name, model=model, tokenizer=tokenizer, layout=layout)
