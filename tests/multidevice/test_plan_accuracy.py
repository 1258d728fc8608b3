"""On 8 fake CPU devices: the planner's bytes per device against the real sharded arrays, and its
activation estimate against XLA's compiled memory analysis."""

import jax
import pytest
from flax import nnx

from lm.bench import compile_memory
from lm.config import load_recipe
from lm.model import Transformer
from lm.plan import estimate
from lm.state.optimizer import make_optimizer
from sharding.mesh import Layout
from sharding.partition import create_sharded

# The tiny and small shapes, cut to a batch and length that compile in seconds here.
SHAPES = {
    "tiny": ("stdlib_tiny", ["train.batch_size=16", "train.seq_len=128"]),
    "small": ("small", ["train.batch_size=16", "train.seq_len=128", "model.n_layers=4"]),
}
MESHES = {
    "fsdp": ["mesh.fsdp=8"],
    "data": ["mesh.data=8", "mesh.fsdp=1"],
    "fsdp_tensor": ["mesh.fsdp=4", "mesh.tensor=2"],
}


def device0_bytes(tree) -> int:
    d0 = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == d0)


@pytest.mark.parametrize(
    "shape, mesh_name", [("tiny", "fsdp"), ("tiny", "fsdp_tensor"), ("small", "data"), ("small", "fsdp_tensor")]
)
def test_parameter_and_optimizer_bytes_match_the_sharded_arrays(shape, mesh_name):
    name, overrides = SHAPES[shape]
    overrides = overrides + MESHES[mesh_name]
    recipe = load_recipe(name, overrides)
    plan = estimate(recipe, devices=8)
    layout = Layout.build(recipe.mesh)
    mesh = layout.mesh
    with layout:

        def make():
            model = Transformer(recipe.model, rngs=nnx.Rngs(0))
            return model, make_optimizer(model, recipe.optimizer, recipe.train.steps)

        model, optimizer = create_sharded(make, layout)
    params, opt = device0_bytes(nnx.state(model, nnx.Param)), device0_bytes(nnx.state(optimizer))
    assert plan.mesh == dict(mesh.shape)
    assert abs(plan.memory.params - params) <= 0.05 * params, (plan.memory.params, params)
    assert abs(plan.memory.optimizer - opt) <= 0.05 * opt, (plan.memory.optimizer, opt)


@pytest.mark.parametrize("remat", ["none", "dots_no_batch", "full"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_activation_estimate_matches_xla_memory_analysis(shape, remat):
    """Everything the step allocates beyond its arguments (gradients, gathered weights, activations,
    logits) against XLA's compiled temp bytes, per device under FSDP over 8 devices."""
    name, overrides = SHAPES[shape]
    recipe = load_recipe(name, overrides + ["mesh.fsdp=8", f"model.remat={remat}"])
    plan = estimate(recipe, devices=8)
    xla = compile_memory(recipe)["temp_bytes"]
    assert abs(plan.memory.temporaries - xla) <= 0.25 * xla, (plan.memory, xla)


def test_cli_prints_xla_memory_analysis_beside_the_estimate_when_the_devices_exist(tmp_path, capsys):
    import json

    from launch.plan import main

    out = tmp_path / "plan.json"
    main(["--recipe", "stdlib_tiny", "--devices", "8", "--set", "train.seq_len=64", "--json", str(out)])
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["n_devices"] == 8 and plan["mesh"] == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1, "expert": 1}
    assert "XLA memory analysis" in printed
    compiled = plan["compiled"]
    # Arguments are the sharded parameters, optimizer state and batch: the estimate's state plus a few KiB.
    assert abs(compiled["argument_bytes"] - plan["memory"]["state"]) <= 0.05 * compiled["argument_bytes"]
    assert abs(compiled["temp_bytes"] - plan["memory"]["temporaries"]) <= 0.25 * compiled["temp_bytes"]


@pytest.mark.parametrize(
    "extra",
    [["train.batch_size=32", "train.grad_accum=2", "model.remat=full"], ["mesh.fsdp=4", "mesh.tensor=2"]],
    ids=["grad_accum", "tensor"],
)
def test_activation_estimate_holds_with_grad_accum_and_tensor_parallelism(extra):
    name, overrides = SHAPES["small"]
    recipe = load_recipe(name, overrides + ["mesh.fsdp=8"] + extra)
    plan = estimate(recipe, devices=8)
    xla = compile_memory(recipe)["temp_bytes"]
    assert abs(plan.memory.temporaries - xla) <= 0.25 * xla, (plan.memory, xla)
