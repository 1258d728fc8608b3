"""Convert between Hugging Face folders and nnx-lm runs.

python -m launch.convert --hf-in DIR --out RUN_DIR                     import: recipe.json, tokenizer files,
                                                                       checkpoints/0 (weights only)
python -m launch.convert (--run-dir DIR | --checkpoint DIR) --hf-out DIR   export: safetensors, config.json,
                                                                       generation_config.json, tokenizer files
                                                                       (a LoRA run: adapters merged)
python -m launch.convert --run-dir LORA_RUN --hf-out DIR --adapter-only    the adapter in PEFT's format:
                                                                       adapter_model.safetensors + adapter_config.json
"""

import argparse
import json
import pathlib
import shutil

from launch.cli import HF_FOLDER, ArgumentParser, add_model_source, add_overwrite, is_writer, main_guard
from launch.distributed import add_arguments, initialize_from_env_or_flags
from lm.errors import UserError


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m launch.convert",
        description="Import a Hugging Face model folder as a run directory, or export a run to one.",
    )
    add_model_source(p, hf_flag="--hf-in", hf_help=f"{HF_FOLDER} to import")
    p.add_argument("--out", help="with --hf-in: the run directory to write")
    p.add_argument("--hf-out", help="with --run-dir/--checkpoint: the Hugging Face folder to write")
    p.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="export: largest safetensors file before splitting (GB)"
    )
    p.add_argument(
        "--tensor",
        type=int,
        default=1,
        help="export: tensor-parallel devices to load the model on (several processes: the model is split over "
        "every device, --tensor of them on the tensor axis and the rest on fsdp)",
    )
    add_overwrite(p)
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="export a LoRA run's adapter alone, in PEFT's format, instead of the merged model",
    )
    add_arguments(p)
    args = p.parse_args(argv)
    if args.adapter_only and not args.hf_out:
        p.error("--adapter-only goes with --run-dir/--checkpoint and --hf-out")
    if args.hf_in and not args.out:
        p.error("--hf-in needs --out RUN_DIR")
    if not args.hf_in and not args.hf_out:
        p.error("--run-dir/--checkpoint need --hf-out DIR")
    if args.hf_in and args.hf_out or not args.hf_in and args.out:
        p.error("use --hf-in with --out, or --run-dir/--checkpoint with --hf-out")
    if args.max_shard_gb <= 0:
        p.error(f"--max-shard-gb={args.max_shard_gb} must be positive")
    return args


def _fresh(folder: pathlib.Path, flag: str, overwrite: bool = False) -> None:
    """Never write over an earlier output unless asked to."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file; choose a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"{flag} {folder} already exists and is not empty; choose a new folder or pass --overwrite")


def import_hf(hf_in: pathlib.Path, out: pathlib.Path) -> None:
    from lm.config import CheckpointConfig, LoggingConfig, Recipe, TrainConfig
    from lm.data.tokenizer import HF_FOLDER_FILES
    from lm.hf import load_hf
    from lm.state.checkpoint import Checkpointer, CheckpointMeta

    _fresh(out, "--out")
    model = load_hf(hf_in)
    cfg = model.cfg
    recipe = Recipe(
        name=hf_in.resolve().name,
        model=cfg,
        train=TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)),
        logging=LoggingConfig(wandb="disabled"),
    )
    out.mkdir(parents=True, exist_ok=True)
    for name in HF_FOLDER_FILES:
        if (hf_in / name).is_file():
            shutil.copyfile(hf_in / name, out / name)
    meta = CheckpointMeta(recipe=recipe.to_dict(), hf_folder=str(hf_in.resolve()))
    checkpointer = Checkpointer(out / "checkpoints", CheckpointConfig(async_save=False))
    try:
        checkpointer.save_params(0, model, meta)
    finally:
        checkpointer.close()
    # recipe.json last: a folder without it is not a run, so an interrupted import is never mistaken for one.
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    print(f"imported {hf_in} ({cfg.n_params:,} parameters) into {out}")


def export_hf(
    run_dir, checkpoint, hf_out: pathlib.Path, max_shard_bytes: int, adapter_only: bool = False, tensor: int = 1
) -> None:
    """Every process loads its part of the model and gathers each tensor in turn; process 0 writes."""
    import jax

    from lm import lora
    from lm.hf import save_hf, save_peft
    from lm.infer.load import load_run, merge_base
    from lm.state.checkpoint import find_checkpoint, read_meta
    from lm.state.source import adapter_base

    folder, step, run = find_checkpoint(run_dir, checkpoint)
    loaded = load_run(run_dir, checkpoint, tensor, need_tokenizer=False)
    recipe, model, tokenizer = loaded.recipe, loaded.model, loaded.tokenizer
    writer = is_writer()
    if adapter_only:
        if not recipe.lora.rank:
            raise UserError(f"--adapter-only needs a LoRA run (lora.rank > 0), but {run} trained every parameter")
        if jax.process_count() > 1:
            raise UserError("--adapter-only runs in one process (the adapter is small); start it without the cluster")
        base = adapter_base(read_meta(folder, step, run), recipe)
        save_peft(model, recipe.lora, hf_out, base_model_name_or_path=base)
        rank = recipe.lora.rank
        print(f"exported the rank-{rank} adapter of step {step} of {run} to {hf_out} (base: {base})")
        return
    if recipe.lora.rank:  # fold the adapters into the base as init.from holds it: not a 4-bit or bfloat16 copy
        with loaded.layout:
            model = lora.merge(model, merge_base(recipe, loaded.layout))
    ids = {}
    if tokenizer is not None:
        ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_id") for k in ("bos", "eos", "pad")}
        ids = {k: v for k, v in ids.items() if v is not None}
    with loaded.layout:
        save_hf(model, hf_out, max_shard_bytes=max_shard_bytes, extra_config=ids, write=writer)
    if not writer:
        return
    if tokenizer is not None:
        tokenizer.save_pretrained(hf_out)
    if (run / "generation_config.json").is_file():  # an imported run keeps its original generation settings
        shutil.copyfile(run / "generation_config.json", hf_out / "generation_config.json")
    print(f"exported step {step} of {run} ({recipe.model.n_params:,} parameters) to {hf_out}")


@main_guard
def main(argv=None):
    args = parse(argv)
    if args.hf_in:
        _fresh(pathlib.Path(args.out), "--out")  # a run folder is never overwritten: --overwrite does not apply
        if initialize_from_env_or_flags(args).source is not None:
            raise UserError("--hf-in imports in one process (one host reads the folder); run it without a launcher")
        import_hf(pathlib.Path(args.hf_in), pathlib.Path(args.out))
        return
    hf_out = pathlib.Path(args.hf_out).expanduser()
    _fresh(hf_out, "--hf-out", args.overwrite)  # before joining a job or loading anything
    initialize_from_env_or_flags(args)
    export_hf(args.run_dir, args.checkpoint, hf_out, int(args.max_shard_gb * 2**30), args.adapter_only, args.tensor)


if __name__ == "__main__":
    main()
