"""Evaluate a run, a checkpoint or a Hugging Face folder on lm-evaluation-harness tasks, offline.

A thin entry over lm_eval.simple_evaluate with nnx-lm's model backend ("nnx-lm"): prints lm_eval's
results table and writes its results JSON. Task data comes from local files (a task YAML with
`dataset_path: json` in --include-path) or from the Hugging Face datasets cache, filled once
beforehand (docs/eval.md); nothing is downloaded here. In a multi-process job (launch.local_cluster,
SLURM, a TPU pod) the model is split over every process's devices, every process runs every request
in the same order, and process 0 alone prints and writes.
"""

import argparse
import json

from launch.cli import ArgumentParser, OutputFile, add_model_source, add_overwrite, is_writer, main_guard
from launch.distributed import add_arguments, initialize_from_env_or_flags


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m launch.eval", description=__doc__)
    add_model_source(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval tasks or groups, e.g. hellaswag,arc_easy")
    p.add_argument("--include-path", help="a folder of task YAML files of your own")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if below 1); default: all")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-gen-toks", type=int, default=256, help="new tokens when a task does not say")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for tasks that sample")
    p.add_argument(
        "--tensor", type=int, default=1,
        help="tensor-parallel devices for a model too large for one (several processes: the model is split over "
        "every device, --tensor of them on the tensor axis and the rest on fsdp)",
    )  # fmt: skip
    p.add_argument(
        "--fsdp", type=int, default=1,
        help="devices the weights (and each batch) are split over (one process; several use every device)",
    )  # fmt: skip
    p.add_argument("--context", type=int, default=1, help="devices each sequence is split over (context parallelism)")
    p.add_argument("--output", help="write lm_eval's results JSON here (e.g. results.json)")
    add_overwrite(p)
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in --output")
    add_arguments(p)
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        p.error("--tasks names no task")
    if args.batch_size < 1:
        p.error(f"--batch-size={args.batch_size} must be at least 1")
    if args.context < 1:
        p.error(f"--context={args.context} must be at least 1")
    if args.limit is not None and args.limit <= 0:
        p.error(f"--limit={args.limit} must be positive")
    if args.log_samples and not args.output:
        p.error("--log-samples needs --output (the samples are written there)")
    return args


@main_guard
def main(argv=None):
    args = parse(argv)
    from lm.evals import TaskSet, backend, evaluate, task_manager

    output = OutputFile(args.output, "--output", args.overwrite) if args.output else None
    tasks = TaskSet(
        tuple(args.tasks), include_path=args.include_path, num_fewshot=args.num_fewshot,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        log_samples=args.log_samples,
    )  # fmt: skip
    manager = task_manager(tasks)  # unknown tasks stop us before the model loads
    initialize_from_env_or_flags(args)
    lm = backend()(
        args.run_dir, args.checkpoint, args.hf, tensor=args.tensor, fsdp=args.fsdp, context=args.context,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks, seed=args.seed,
    )  # fmt: skip
    results = evaluate(lm, tasks, manager=manager)  # every process, every request (SPMD)
    if not is_writer():
        return
    from lm_eval.utils import handle_non_serializable, make_table

    limit = f", limit {args.limit:g}" if args.limit else ""
    print(f"{lm.name}: {', '.join(args.tasks)}{limit}; mesh {lm.layout.shape}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if output:
        if not args.log_samples:
            results.pop("samples", None)
        with output.writing() as path:
            path.write_text(json.dumps(results, indent=2, default=handle_non_serializable))


if __name__ == "__main__":
    main()
