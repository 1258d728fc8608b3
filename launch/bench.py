"""Benchmarks: python -m launch.bench train|decode|compile|memory --recipe NAME [--set k=v ...] --json OUT

Writes one JSON object to --json and appends a dated row (with versions) to docs/benchmarks.md.
"""

import datetime
import json
import pathlib
import platform
import subprocess
import sys

from launch.cli import ArgumentParser, load_recipe, main_guard
from lm.errors import UserError

TABLE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def parse(argv=None):
    p = ArgumentParser(prog="python -m launch.bench", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["train", "decode", "compile", "memory"])
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", required=True, help="where to write the result")
    p.add_argument("--steps", type=int, default=10, help="train: timed steps (after 2 warm-up steps)")
    p.add_argument(
        "--meshes",
        nargs="*",
        default=[],
        metavar="D,F,T",
        help="train: one measurement per mesh shape data,fsdp,tensor (e.g. 8,1,1 1,4,2)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="train: also write a jax.profiler trace of two steps to DIR and summarise it by op class in the JSON",
    )
    p.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 16], help="compile: model depths")
    p.add_argument("--modes", nargs="*", default=["scan", "unrolled"], choices=["scan", "unrolled"], help="compile")
    p.add_argument("--skip-uncached", action="store_true", help="decode: do not time --kv-cache off")
    p.add_argument(
        "--contexts",
        type=int,
        nargs="*",
        default=[64, 256, 512],
        help="decode: prompt lengths of the ms/step-by-context sweep (none: skip it)",
    )
    p.add_argument("--no-table", action="store_true", help="do not append to docs/benchmarks.md")
    return p.parse_args(argv)


def summary(mode: str, result: dict) -> str:
    if mode == "train":
        runs = result.get("runs", [result])
        return "; ".join(
            f"mesh {tuple(r['mesh'].values())}: {r['tokens_per_s']:,.0f} tok/s, "
            f"{1e3 * r['step_s_median']:.0f} ms/step (CPU {1e3 * r['cpu_s_per_step_median']:.0f} ms), "
            f"{r['tflops_per_device']:.3f} TFLOP/s/dev, MFU {100 * r['mfu']:.1f}% "
            f"(MaxText {100 * r['mfu_maxtext']:.1f}%), best {r['tokens_per_s_best']:,.0f} tok/s, "
            f"state {r['state_bytes_per_device'] / 2**20:.2f} MiB/dev"
            for r in runs
        ) + "".join(
            f"; profile ms/step (all threads): {r['profile']['ms_per_step_by_class']}" for r in runs if "profile" in r
        )
    if mode == "decode":
        parts = [
            f"{k}: prefill {v['prefill_tokens_per_s']:,.0f} tok/s, decode {v['decode_tokens_per_s']:,.0f} tok/s "
            f"({v['ms_per_step']:.2f} ms/step; {v['new_tokens_per_s']:,.0f} tok/s with prefill) "
            + (f"(cache {v['cache_speedup']:.1f}x faster than off)" if "cache_speedup" in v else "")
            for k, v in result.items()
            if k.startswith("batch") and isinstance(v, dict)
        ]
        parts.append(f"batch-1 bandwidth fraction {result['batch1_bandwidth_fraction']:.2f}")
        ctx = ", ".join(f"{k}: {v:.2f}" for k, v in result["ms_per_step_by_context"].items())
        return "; ".join(parts) + f"; ms/step by context {{{ctx}}}"
    if mode == "compile":
        return ", ".join(f"{k} {v:.1f}s" for k, v in result["seconds_to_first_step"].items())
    peak = result["peak_bytes_per_device"]
    return f"peak {peak / 2**20:.1f} MiB/device" if peak else "peak unknown"


@main_guard
def main(argv=None):
    args = parse(argv)
    import flax
    import jax

    from lm import bench as benchmark
    from lm.config import MeshConfig

    recipe, _ = load_recipe(args.recipe, args.overrides)
    if args.mode == "train":
        if args.meshes:
            shapes = []
            for m in args.meshes:
                try:
                    shapes.append(tuple(int(x) for x in m.split(",")))
                except ValueError:
                    raise UserError(f"--meshes takes data,fsdp,tensor triples like 1,4,2; got {m!r}") from None
            result = {"runs": [benchmark.bench_train(recipe, args.steps, mesh_cfg=MeshConfig(*s)) for s in shapes]}
        else:
            result = benchmark.bench_train(recipe, args.steps, profile_dir=args.profile)
    elif args.mode == "compile":
        result = benchmark.bench_compile(recipe, tuple(args.depths), tuple(args.modes))
    elif args.mode == "decode":
        result = benchmark.bench_decode(recipe, contexts=tuple(args.contexts), uncached=not args.skip_uncached)
    else:
        result = {
            "memory": benchmark.bench_memory,
        }[args.mode](recipe)
    device = jax.devices()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "mode": args.mode,
        "recipe": recipe.name,
        "overrides": args.overrides,
        "device": f"{jax.device_count()} x {device.device_kind}",
        "platform": device.platform,
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        **result,
    }
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    line = summary(args.mode, result)
    print(line)
    if not args.no_table and jax.process_index() == 0:
        command = "python -m launch.bench " + " ".join(sys.argv[1:] if argv is None else argv)
        if not TABLE.exists():
            TABLE.parent.mkdir(exist_ok=True)
            TABLE.write_text(
                "# Benchmarks\n\nAppended by `launch.bench`; newest last. MFU uses the PaLM formula "
                "(6N + 12·L·T·H·D FLOPs per token).\n\n| date | mode | device | versions | command | "
                "result |\n|---|---|---|---|---|---|\n"
            )
        with TABLE.open("a") as f:
            f.write(
                f"| {result['date']} | {args.mode} | {result['device']} | jax {jax.__version__}, flax "
                f"{flax.__version__}, commit {result['commit']} | `{command.replace('|', '/')}` | "
                f"{line.replace('|', '/')} |\n"
            )


if __name__ == "__main__":
    main()
