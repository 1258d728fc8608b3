"""Plan a recipe before launch: its sharding, memory per device, whether it fits, and its step time.

python -m launch.plan --recipe NAME [--set k=v ...] [--devices N | --topology v5p-128 | --gpu 'h100-80gb x8']
[--json OUT]

Prints parameters, FLOPs, the mesh and each parameter's sharding, memory per device, whether it
fits, the largest batch that does, and the predicted step time. Exit 1 when it does not fit, 2 on
bad input (including every indivisible dimension), 0 otherwise.
"""

import json
import pathlib
import sys

from launch.cli import ArgumentParser, load_recipe, main_guard
from lm.errors import UserError


def parse(argv=None):
    p = ArgumentParser(prog="python -m launch.plan", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", help="recipe name or .py file (required unless --calibrate)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--devices", type=int, help="this many devices of this machine's kind")
    where.add_argument("--topology", help="a TPU slice (v5e-256, v5p-128, 'v6e-256 x2') or any named topology")
    where.add_argument("--gpu", help="GPUs, e.g. 'h100-80gb x8', 'a100-80gb x8', 'l4-24gb'")
    p.add_argument("--mfu", type=float, help="assumed MFU for the step time (default: the device's; 0.5 on TPU)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (default: data sheet; CPU: measured)")
    p.add_argument("--json", help="write the whole plan here")
    p.add_argument("--no-compile", action="store_true", help="skip XLA's memory analysis even where devices exist")
    p.add_argument(
        "--calibrate",
        nargs="*",
        metavar="REMAT",
        help="refit the activation coefficients (lm.plan.planner KEPT, WORKING) to this CPU's XLA for these remat "
        "policies (default: all) and print them; takes minutes",
    )
    return p.parse_args(argv)


def mib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report(plan, recipe) -> str:
    from lm.plan import REMATS

    m, s, mem = recipe.model, plan.step, plan.memory
    lines = [
        f"recipe {plan.recipe} on {plan.hardware}: {plan.n_devices} x {plan.device}"
        + (f" in {plan.slices} slices" if plan.slices > 1 else ""),
        *([f"about: {recipe.description}"] if recipe.description else []),
        f"parameters: {plan.params:,} ({plan.params_non_embedding:,} non-embedding, {plan.params_embedding:,} "
        f"embedding{', tied head' if m.tie_embeddings else ''})"
        + (f"; active per token {plan.active_params:,}" if plan.active_params != plan.params else "")
        + (f"; trainable {plan.trainable_params:,}" if plan.trainable_params != plan.params else ""),
        f"FLOPs per token: {plan.flops_per_token / 1e9:.3f} GFLOP (6N + 12*L*T*H*D at seq {recipe.train.seq_len}); "
        f"{plan.tokens_per_step:,} tokens per step ({plan.batch_size} x {recipe.train.seq_len}, "
        f"grad_accum {plan.grad_accum})",
        f"mesh: {plan.mesh}"
        + (f" (DCN part {plan.dcn})" if any(v > 1 for v in plan.dcn.values()) else "")
        + f"; {plan.rows_per_device:g} rows per device per microbatch",
        "sharding (per device):",
    ]
    for g in plan.groups:
        spec = "(" + ", ".join(str(a) for a in g.spec) + ")"
        lines.append(f"  {g.path:34s} {str(list(g.shape)):24s} {spec:30s} {mib(g.bytes_per_device)}")
    lines += [
        f"memory per device (remat={plan.remat}):",
        f"  parameters      {mib(mem.params)}",
        f"  optimizer       {mib(mem.optimizer)}",
        *(
            [f"  reference       {mib(mem.reference)}   the frozen reference model (dpo, grpo)"]
            if mem.reference
            else []
        ),
        f"  gradients       {mib(mem.gradients)}",
        f"  gathered (FSDP) {mib(mem.gathered)}",
        f"  activations     {mib(mem.activations)}   kept by all layers",
        f"  one layer       {mib(mem.working)}   working set of the layer being differentiated",
        f"  logits          {mib(mem.logits)}   (float32, unchunked; freed before the layers' backward, so the "
        "larger of these two counts)",
        "  activations + max(one layer, logits) by remat: "
        + ", ".join(f"{r} {mib(mem.activations_by_remat[r])}" for r in REMATS),
        *(
            [
                f"  experts         {mib(mem.experts)}   of parameters and optimizer: the routed experts, split "
                "over mesh.expert x fsdp x tensor",
                f"  all-to-all      {mib(mem.all_to_all)}   expert-parallel buffers of the MoE layer in flight",
            ]
            if mem.experts
            else []
        ),
        *(
            [f"  grpo rollout    {mib(mem.generation)}   KV cache of train.batch_size completions, between steps"]
            if mem.generation
            else []
        ),
        f"  total           {mib(mem.total)} of {mib(plan.capacity_bytes)} usable "
        f"-> {'fits' if plan.fits else 'DOES NOT FIT'}",
        f"  generation: KV cache {mib(mem.kv_cache_per_sequence)} per sequence of {m.max_seq_len} tokens",
        "largest rows per device per microbatch that fit: "
        + ", ".join(f"{r} {plan.max_rows_per_device[r]}" for r in REMATS)
        + f"; remat it would choose: {plan.chosen_remat or 'none fits'}",
        f"step: {s.step_s * 1e3:,.1f} ms predicted -> {s.tokens_per_s:,.0f} tokens/s "
        f"(compute {s.compute_s * 1e3:,.1f} ms at MFU {s.mfu:.2f} of {s.peak_tflops:.3g} TFLOP/s per device "
        f"[{s.peak_source}]; FSDP {s.fsdp_s * 1e3:,.1f} ms, data {s.data_s * 1e3:,.1f} ms, "
        f"tensor {s.tensor_s * 1e3:,.1f} ms, context {s.context_s * 1e3:,.1f} ms, DCN {s.dcn_s * 1e3:,.1f} ms"
        + (
            f", expert all-to-all {s.expert_s * 1e3:,.1f} ms ICI + {s.expert_dcn_s * 1e3:,.1f} ms DCN"
            if mem.experts
            else ""
        )
        + ")",
    ]
    if plan.compiled:
        c = plan.compiled
        lines.append(
            f"XLA memory analysis: arguments {mib(c['argument_bytes'])}, temp {mib(c['temp_bytes'])}, "
            f"total {mib(c['total_bytes'])} (estimate: state {mib(mem.state)}, temp {mib(mem.temporaries)}, "
            f"total {mib(mem.total)})"
        )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


@main_guard
def main(argv=None):
    args = parse(argv)
    from lm import bench
    from lm import plan as planner

    if args.calibrate is not None:
        for remat in args.calibrate or planner.REMATS:
            if remat not in planner.REMATS:
                raise UserError(f"--calibrate {remat!r}: choose remat policies from {list(planner.REMATS)}")
            kept, working, error = bench.fit_activation_terms(remat)
            print(f"{remat}: KEPT {kept}, WORKING {working}; largest fit error {100 * error:.1f}%", flush=True)
        return
    if not args.recipe:
        raise UserError("--recipe is required (or --calibrate)")
    recipe, _ = load_recipe(args.recipe, args.overrides)
    if args.devices is not None and args.devices <= 0:
        raise UserError(f"--devices={args.devices} must be positive")
    for name, value in (("--mfu", args.mfu), ("--peak-tflops", args.peak_tflops)):
        if value is not None and not (value > 0 and (name != "--mfu" or value <= 1)):
            raise UserError(f"{name}={value} is out of range; use a positive number (MFU at most 1)")
    plan = planner.estimate(recipe, args.topology or args.gpu, args.devices, mfu=args.mfu, peak_tflops=args.peak_tflops)
    if not args.no_compile and not plan.problems and bench.can_compile(plan):
        import dataclasses

        plan = dataclasses.replace(plan, compiled=bench.compile_memory(recipe))
    print(report(plan, recipe))
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(plan.to_dict(), indent=2))
    if plan.problems:
        for p in plan.problems:
            print(f"error: {p}", file=sys.stderr)
        sys.exit(2)
    if not plan.fits:
        print(
            f"error: {plan.recipe} needs {mib(plan.memory.total)} per device but {plan.hardware} has "
            f"{mib(plan.capacity_bytes)} usable; at most {plan.max_rows_per_device[plan.remat]} rows per device fit "
            f"with remat={plan.remat}"
            + (
                f"; try model.remat={plan.chosen_remat}"
                if plan.chosen_remat
                else "; use more devices or a smaller batch"
            ),
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
