"""The planner: every recipe plans and fits its hardware, oversized plans fail with numbers and exit 1,
bad input exits 2, and its counts agree with independent computations."""

import json
import math

import pytest
from helpers import run_cli

from lm.config import PRESETS, available_recipes, load_recipe
from lm.errors import UserError
from lm.plan import estimate


def plan_cli(tmp_path, *args):
    out = tmp_path / "plan.json"
    result = run_cli("launch.plan", *args, "--json", str(out), timeout=900)
    return result, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_plans_and_fits_its_intended_hardware(tmp_path, name, capsys):
    """`launch.plan --recipe <name> --no-compile` for every recipe, its whole command line in this
    process (a new process per recipe cost ~4 s of start-up each; the command's exit codes and
    one-line errors are run as a user runs them below): no exit, no divisibility problem, fits by
    the estimate."""
    from launch.plan import main

    main(["--recipe", name, "--no-compile", "--json", str(tmp_path / "plan.json")])
    assert "DOES NOT FIT" not in capsys.readouterr().out, name
    plan = json.loads((tmp_path / "plan.json").read_text())
    recipe = load_recipe(name)
    assert plan["fits"] and not plan["problems"], name
    assert plan["hardware"] == (recipe.hardware or "cpu x1"), name
    assert plan["memory"]["total"] <= plan["capacity_bytes"]


def test_every_recipe_names_its_hardware_or_runs_here():
    for name in available_recipes():
        recipe = load_recipe(name)
        plan = estimate(recipe)
        assert plan.fits and not plan.problems, (name, plan.memory.total, plan.capacity_bytes, plan.problems)
        if name not in ("stdlib_tiny", "small"):
            assert recipe.hardware and recipe.description, f"{name} should name its hardware and data"


def test_oversized_variant_is_reported_not_fitting_with_numbers_and_exit_1(tmp_path):
    result, plan = plan_cli(
        tmp_path, "--recipe", "llama3_8b_v5p_128", "--gpu", "l4-24gb", "--set", "train.per_device_batch_size=64"
    )
    assert result.returncode == 1, result.stderr
    assert "DOES NOT FIT" in result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: llama3_8b_v5p_128 needs ") and "GiB per device" in error and "l4-24gb" in error
    assert plan["fits"] is False and plan["memory"]["total"] > plan["capacity_bytes"]
    # Even the parameters and Adam state alone (8B x 12 bytes) exceed 24 GB.
    assert plan["memory"]["params"] + plan["memory"]["optimizer"] > 24e9


def test_gpt2_124m_has_nanogpt_parameter_count_with_tied_head():
    plan = estimate(load_recipe("gpt2_124m"))
    # nanoGPT counts 124,439,808 parameters with the position embeddings and prints 123.65M without them.
    assert plan.params == 124_439_808
    assert plan.params - 1024 * 768 == 123_653_376
    assert not any(g.path.startswith("lm_head") for g in plan.groups)  # tied: the embedding is the head


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_from_the_built_model_equals_the_config_formula(name):
    from lm.config import Recipe, TrainConfig

    cfg = PRESETS[name]
    plan = estimate(Recipe(model=cfg, train=TrainConfig(batch_size=1, seq_len=8)), "cpu")
    assert plan.params == cfg.n_params
    assert plan.params_embedding + plan.params_non_embedding == plan.params


def test_every_divisibility_problem_is_listed_as_trainings_error(tmp_path):
    from sharding.mesh import Layout
    from sharding.partition import check_divisible
    from sharding.rules import logical_rules

    # small has 6 heads and a global batch of 32: tensor=4 fails heads and kv heads, data=64 the batch.
    overrides = ["mesh.tensor=4", "mesh.data=64", "mesh.fsdp=1"]
    result, plan = plan_cli(tmp_path, "--recipe", "small", "--topology", "v5p-512", *[f"--set={o}" for o in overrides])
    assert result.returncode == 2
    errors = [line.removeprefix("error: ") for line in result.stderr.strip().splitlines()]
    assert errors == plan["problems"] and len(errors) == 3
    recipe = load_recipe("small", overrides)
    from lm.hardware import topology
    from lm.plan import plan_mesh

    mesh, _, _ = plan_mesh(recipe, topology("v5p-512"))
    for name in ("heads", "kv_heads", "batch"):
        with pytest.raises(UserError) as e:
            check_divisible({name: recipe.logical_dims()[name]}, Layout(mesh, logical_rules(())))
        assert str(e.value) in errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology", "v9z-12"], "unknown topology"),
        (["--devices", "0"], "must be positive"),
        (["--mfu", "1.5"], "out of range"),
        (["--set", "mesh.fsdp=3"], "mesh data*fsdp*context*tensor*expert = 1*3*1*1*1"),
        (["--devices", "4", "--set", "mesh.data=3"], "do not divide the 4 devices"),
        (["--topology", "v5p-128", "--set", "mesh.dcn_data=2"], "slices requested"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result, _ = plan_cli(tmp_path, "--recipe", "stdlib_tiny", "--no-compile", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_step_time_is_flops_over_peak_times_mfu_without_communication():
    recipe = load_recipe("gpt2_124m")
    plan = estimate(recipe, "a100-80gb", mfu=0.5)
    flops = recipe.model.flops_per_token(1024) * 512 * 1024
    assert plan.step.fsdp_s == plan.step.data_s == plan.step.tensor_s == plan.step.dcn_s == 0
    assert math.isclose(plan.step.step_s, flops / (312e12 * 0.5), rel_tol=1e-9)
    assert math.isclose(plan.step.tokens_per_s, 512 * 1024 / plan.step.step_s)


def test_fsdp_and_tensor_communication_follow_ring_collectives():
    recipe = load_recipe("qwen3_0_6b", ["mesh.fsdp=4", "mesh.tensor=2", "train.grad_accum=1", "train.batch_size=64"])
    plan = estimate(recipe, "h100-80gb x8")
    n, bw = plan.params, 450e9
    weights = n * 2 / 2  # bf16, split by tensor
    grads = sum(g.bytes_per_device for g in plan.groups)  # float32 shards
    expect_fsdp = 2 * 3 / 4 * weights / bw + 3 / 4 * grads * 4 / bw
    assert math.isclose(plan.step.fsdp_s, expect_fsdp, rel_tol=1e-6)
    rows = 64 / 4
    expect_tp = 28 * 4 * 2 * (1 / 2) * rows * 4096 * 1024 * 2 / bw
    assert math.isclose(plan.step.tensor_s, expect_tp, rel_tol=1e-6)


def test_remat_choice_is_the_least_recompute_that_fits():
    recipe = load_recipe("gpt2_124m", ["train.grad_accum=4"])  # 128 rows per microbatch on one GPU
    plan = estimate(recipe, "a100-80gb")
    assert not plan.fits and "does not fit" in plan.summary()
    fits = {
        r: plan.memory.state + plan.memory.gradients + plan.memory.gathered + a <= plan.capacity_bytes
        for r, a in plan.memory.activations_by_remat.items()
    }
    assert plan.chosen_remat == next((r for r in ("none", "dots", "dots_no_batch", "full") if fits[r]), None)
    assert plan.max_rows_per_device["full"] >= plan.max_rows_per_device["none"]


def test_lora_plan_counts_adapters_and_a_low_precision_base():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Lora:  # the fields the planner reads, as the fine-tuning recipes will set them
        rank: int = 8
        targets: tuple = ("attn",)
        base_dtype: str = "bfloat16"

    recipe = load_recipe("small")
    full = estimate(recipe, "cpu")
    object.__setattr__(recipe, "lora", Lora())
    lora = estimate(recipe, "cpu")
    m = recipe.model
    hd = m.dim_per_head
    per_layer = 8 * ((m.d_model + m.n_heads * hd) * 2 + (m.d_model + m.n_kv_heads * hd) * 2)  # q, out, k, v
    assert lora.trainable_params == m.n_layers * per_layer
    assert lora.memory.optimizer == 2 * lora.trainable_params * 4
    assert lora.memory.params == full.memory.params // 2 + lora.trainable_params * 4


@pytest.mark.slow
def test_predicted_step_time_is_within_2x_of_the_benchmark_on_this_cpu():
    """The small shape on this CPU: FLOPs at the CPU's default MFU over its measured matmul peak,
    against launch.bench's timed steps. The peak is measured around the benchmark (the machine is
    shared, so its speed drifts) and both sides see the same load."""
    from lm.bench import bench_train
    from lm.hardware import measure_peak_tflops

    recipe = load_recipe("small", ["train.batch_size=8", "train.seq_len=256"])
    before = measure_peak_tflops()
    measured = bench_train(recipe, steps=3, warmup=1)["step_s_median"]
    peak = (before + measure_peak_tflops()) / 2
    predicted = estimate(recipe, "cpu", peak_tflops=peak).step.step_s
    assert 0.5 <= predicted / measured <= 2.0, (predicted, measured, peak)


def test_context_parallelism_splits_activations_and_costs_kv_traffic():
    """mesh.context=c divides the tokens on each device (activations and logits fall about as 1/c,
    the all-gathered K/V aside), and K/V crossing the context axis is in the step time: on the
    critical path for allgather, overlapped for ring."""
    keys = ["model.attention_impl=xla", "train.batch_size=8", "train.seq_len=8192", "train.grad_accum=1", "mesh.fsdp=8"]
    plans = {
        (c, mode): estimate(
            load_recipe("qwen3_0_6b", [*keys, f"mesh.context={c}", f"model.context_parallel={mode}"]),
            f"h100-80gb x{8 * c}",
        )
        for c, mode in ((1, "allgather"), (4, "allgather"), (4, "ring"))
    }
    one, gathered, ring = plans[1, "allgather"], plans[4, "allgather"], plans[4, "ring"]
    acts = {key: p.memory.activations_by_remat["full"] for key, p in plans.items()}
    assert acts[4, "allgather"] < acts[1, "allgather"] / 4 * 1.25, acts
    assert acts[4, "ring"] < acts[4, "allgather"], acts  # the ring holds blocks, not the whole K/V
    m, bw = load_recipe("qwen3_0_6b").model, 450e9
    kv = 8192 * 2 * m.n_kv_heads * m.dim_per_head * 2  # one row per device, bf16
    assert one.step.context_s == 0
    # K/V forward (again under remat's recompute), again in the backward pass, float32 gradients back
    passes = (2 if m.remat != "none" else 1) + 1 + 2
    assert math.isclose(gathered.step.context_s, m.n_layers * passes * (3 / 4) * kv / bw, rel_tol=1e-6)
    assert math.isclose(gathered.step.step_s - ring.step.step_s, gathered.step.context_s, rel_tol=1e-6)


def test_a_frozen_reference_model_is_counted_where_it_exists():
    """dpo/grpo: a LoRA run's reference is its base with the adapters off (no bytes); a full fine-tune
    keeps a frozen copy of the starting weights, and a folder reference is counted at the policy's size."""
    from lm.config import apply_overrides

    dpo = load_recipe("dpo_tiny")
    sft = estimate(apply_overrides(dpo, ["train.objective=sft", "lora.rank=0"]), "cpu")
    full = estimate(apply_overrides(dpo, ["lora.rank=0"]), "cpu")
    lora = estimate(dpo, "cpu")
    folder = estimate(apply_overrides(dpo, ["objective.reference=runs/sft"]), "cpu")
    grpo = estimate(apply_overrides(load_recipe("grpo_tiny"), ["lora.rank=0"]), "cpu")
    params = sum(math.prod(g.shape) for g in full.groups) * 4  # float32 weights, one device
    assert sft.memory.reference == lora.memory.reference == 0
    assert full.memory.reference == folder.memory.reference == grpo.memory.reference == params
    assert full.memory.state == full.memory.params + full.memory.optimizer + params
    assert full.memory.total == sft.memory.total - sft.memory.temporaries + full.memory.temporaries + params


def test_expert_parallelism_splits_expert_state_and_costs_all_to_all_time():
    """mesh.expert=e (taking devices from mesh.data) divides the experts' weights and optimizer state
    per device by e; the all-to-all buffers and their time follow the tokens each device routes,
    over ICI inside an 8-GPU host and over DCN to the peers in the other host."""
    keys = ["model.n_layers=2", "train.batch_size=16", "train.seq_len=1024", "train.grad_accum=1", "mesh.fsdp=1"]

    def plan(expert, hardware="h100-80gb x8"):
        sets = [*keys, f"mesh.data={-1}", f"mesh.expert={expert}"]
        return estimate(load_recipe("qwen3_30b_a3b_v5p_128", sets), hardware)

    plans = {e: plan(e) for e in (1, 2, 8)}
    m = load_recipe("qwen3_30b_a3b_v5p_128", keys).model
    expert_params = sum(m.moe_layers) * 3 * m.n_experts * m.d_model * m.expert_d_ff
    assert plans[1].memory.experts == expert_params * 4 * 3  # float32 weights and two Adam moments
    for e, p in plans.items():
        assert p.memory.experts * e == plans[1].memory.experts, e
        assert p.memory.params < plans[1].memory.params or e == 1
    # One buffer: [e, tokens per device * k, d_model] in bf16; a device sends (e - 1) / e of each of the
    # four all-to-alls per MoE layer (two forward, two backward).
    tokens = plans[8].rows_per_device * 1024
    buffer = 8 * tokens * m.experts_per_token * m.d_model * 2
    assert plans[1].memory.all_to_all == 0 and plans[1].step.expert_s == 0
    assert plans[8].memory.all_to_all == 3 * buffer
    ici, dcn = plans[8].step.expert_s, plans[8].step.expert_dcn_s
    assert math.isclose(ici, 4 * 2 * buffer * 7 / 8 / 450e9, rel_tol=1e-6) and dcn == 0
    # Two hosts, expert 16 with no DCN axis: 8 of 15 peers are in the other host.
    wide = plan(16, "h100-80gb x16")
    assert wide.step.expert_dcn_s > 0 and wide.step.expert_s > 0
    assert math.isclose(wide.step.step_s - wide.step.expert_s - wide.step.expert_dcn_s,
                        max(wide.step.compute_s, wide.step.fsdp_s + wide.step.data_s + wide.step.dcn_s)
                        + wide.step.tensor_s + wide.step.context_s, rel_tol=1e-9)  # fmt: skip


def test_planner_names_mesh_expert_when_it_does_not_divide_the_experts():
    recipe = load_recipe("qwen3_30b_a3b_v5p_128", ["model.n_layers=2", "mesh.fsdp=-1", "mesh.expert=3"])
    plan = estimate(recipe, "h100-80gb x6")
    assert any("mesh.expert=3" in p and "model.n_experts=128" in p for p in plan.problems), plan.problems
    with pytest.raises(UserError, match=r"tensor\*expert = 1\*1\*1\*1\*3 = 3 but there are 8 devices"):
        estimate(load_recipe("qwen3_30b_a3b_v5p_128", ["mesh.fsdp=1", "mesh.data=1", "mesh.expert=3"]), "h100-80gb x8")


@pytest.mark.slow
def test_planned_adapters_count_one_per_expert():
    """The planner's trainable count of a LoRA run on an MoE model equals the adapters lm.lora builds,
    and both count for MFU only the routed experts' share of the expert adapters."""
    import dataclasses

    from flax import nnx

    from lm import lora
    from lm.model import Transformer

    overrides = ["lora.rank=4", "model.n_experts=4", "model.moe_d_ff=48", "model.n_layers=2", "model.vocab_size=256"]
    recipe = load_recipe("stdlib_tiny", overrides)
    model = Transformer(dataclasses.replace(recipe.model, dtype="float32"), rngs=nnx.Rngs(0))
    lora.apply(model, recipe.lora)
    plan = estimate(recipe)
    assert plan.trainable_params == lora.count(model)[0]
    adapters = lora.adapters(model).values()
    experts = sum(m.lora_a.size + m.lora_b.size for m in adapters if isinstance(m, lora.ExpertLoRA))
    assert 0 < experts < plan.trainable_params
    computed = plan.trainable_params - experts + experts * recipe.model.experts_per_token // recipe.model.n_experts
    assert lora.computed(model) == computed
    assert plan.flops_per_token == recipe.model.flops_per_token(recipe.train.seq_len, adapter_params=computed)
