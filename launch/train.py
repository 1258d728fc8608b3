"""Train a recipe: python -m launch.train --recipe stdlib_tiny [--run-dir DIR] [--set key.path=value ...]"""

import argparse
import pathlib
import time

from launch.cli import ArgumentParser, load_recipe, main_guard
from launch.distributed import add_arguments, initialize_from_env_or_flags


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m launch.train", description=__doc__.split(":")[0] + ".")
    p.add_argument("--recipe", required=True, help="a name from recipes/ (e.g. stdlib_tiny) or a path to a .py file")
    p.add_argument(
        "--run-dir",
        help="where recipe.json, metrics.jsonl and checkpoints/ go (default runs/<recipe>); "
        "an existing run directory is resumed",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. train.steps=200 or mesh.fsdp=4 (repeatable)",
    )
    p.add_argument("--list-keys", action="store_true", help="print every settable key with its value and exit")
    add_arguments(p)
    return p.parse_args(argv)


@main_guard
def main(argv=None):
    args = parse(argv)
    initialize_from_env_or_flags(args)  # before any JAX computation: joins a multi-process run if there is one
    import jax  # after argparse, so --help is instant

    from lm.config import all_keys
    from lm.train.loop import train

    recipe, source = load_recipe(args.recipe, args.overrides)
    if args.list_keys:
        flat = recipe.to_dict()
        for key in all_keys():
            value = flat
            for part in key.split("."):
                value = value[part]
            print(f"{key}={value!r}")
        return
    run_dir = pathlib.Path(args.run_dir or f"runs/{recipe.name}")
    start = time.perf_counter()
    result = train(recipe, run_dir, source=source)
    if result.preempted is not None or jax.process_index() != 0:  # the loop has said where the checkpoint is
        return
    last = result.last
    if result.step:
        print(
            f"\ntrained {result.params / 1e6:.2f}M parameters to step {result.step} in "
            f"{time.perf_counter() - start:.0f} s; final loss {last['loss']:.3f}"
            + (f", eval loss {last['eval_loss']:.3f}" if "eval_loss" in last else "")
            + (f" (untrained: {result.initial_eval_loss:.3f})" if result.initial_eval_loss else "")
        )
        print(f"run directory: {run_dir}")
    if result.sample:
        print("\n--- sample ---\n" + result.sample + "\n--------------")


if __name__ == "__main__":
    main()
