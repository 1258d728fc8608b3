"""Plan a recipe before launch: how it shards, how much memory each device needs, whether it fits,
and how long a step should take - on this laptop, for a TPU slice or a GPU box it has never seen.

Parameter and optimizer bytes are exact: the real model and optimizer are built abstractly
(`nnx.eval_shape`) under an abstract mesh of the target's shape, and each leaf is split as the one
rules table (sharding/rules.py) says. Activation bytes come from per-policy formulas calibrated
against XLA's compiled memory analysis (tests/multidevice/test_plan_accuracy.py keeps them honest).
Step time is FLOPs at a stated MFU plus the collectives FSDP and tensor parallelism need, and for
mixtures of experts the all-to-alls that carry tokens to their experts' devices (mesh.expert).
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from lm.config import ModelConfig, Recipe
from lm.errors import UserError
from lm.hardware import Topology, device_for_kind, measure_peak_tflops, topology
from lm.kernels.context import KEY_BLOCK
from lm.model import Transformer
from lm.state.optimizer import make_optimizer
from sharding.mesh import AXES, Layout, resolve_shape
from sharding.partition import check_divisible
from sharding.rules import logical_rules

# The share of a device's memory a step may plan to use: XLA's own workspace, fragmentation and the
# runtime take the rest. (On GPUs also raise XLA_PYTHON_CLIENT_MEM_FRACTION above its 0.75 default.)
USABLE_FRACTION = 0.9

# Remat policies from most memory (least recompute) to least memory (most recompute).
REMATS = ("none", "dots", "dots_no_batch", "full")

# Activation elements per token, as coefficients of (1, d_model, (2*heads + 2*kv_heads) * head_dim,
# d_ff, heads * seq_len), fitted to XLA's buffer assignment (compiled temp bytes) on CPU for each remat
# policy by varying one dimension at a time (docs/recipes.md has the fit; the multi-device accuracy
# test keeps it honest). KEPT: saved for the backward pass by every layer. WORKING: the one layer
# being recomputed and differentiated at a time.
KEPT = {
    "none": (14.0, 8.0, 1.0, 6.0, 2.0),
    "dots": (0.0, 0.0, 1.53, 1.98, 0.98),
    "dots_no_batch": (0.0, 0.0, 1.21, 1.91, 0.0),
    "full": (0.0, 0.9, 0.02, 0.0, 0.01),
}
WORKING = {
    "none": (3.0, 3.25, 1.0, 5.0, 2.27),
    "dots": (0.0, 0.0, 2.01, 6.78, 1.81),
    "dots_no_batch": (0.0, 0.0, 1.57, 5.59, 1.84),
    "full": (1047.5, 9.55, 0.95, 8.0, 2.0),
}
# Float32 logits per token (x vocab / tensor): the logits and their gradient. They are freed before the
# layers' backward pass starts, so they never coexist with WORKING: the peak takes the larger.
LOGIT_COPIES = 2


def _bytes(dtype) -> float:
    return {"nf4": 0.5, "int4": 0.5}.get(str(dtype), None) or jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """One parameter array (stacked over layers where scanned) and how it is split."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: tuple  # mesh axes per dimension, as in a PartitionSpec
    bytes_per_device: int


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device for one training step (and, separately, generation's KV cache)."""

    params: int
    optimizer: int
    gradients: int
    gathered: int  # weights FSDP all-gathers for the layer in flight (forward and backward)
    activations: int  # kept for the backward pass by all layers, under the recipe's remat policy
    working: int  # the one layer being recomputed and differentiated
    logits: int  # float32 logits and their gradient (unchunked); never live together with `working`
    activations_by_remat: dict[str, int]  # activations + max(working, logits), per policy
    kv_cache_per_sequence: int  # generation at model.max_seq_len, one sequence
    generation: int = 0  # train.objective=grpo: the rollout's KV cache, between (not beside) train steps
    reference: int = 0  # dpo/grpo: a frozen reference model of its own (not the LoRA base, adapters off)
    # Mixture of experts. experts: the routed experts' weights and optimizer state, as split over
    # mesh.expert x fsdp x tensor (already part of params and optimizer). all_to_all: the buffers the
    # MoE layer in flight sends and receives under expert parallelism (beside `working`).
    experts: int = 0
    all_to_all: int = 0

    @property
    def state(self) -> int:
        return self.params + self.optimizer + self.reference

    @property
    def temporaries(self) -> int:
        """What XLA reports as temp bytes: everything the step allocates beyond its arguments."""
        return self.gradients + self.gathered + self.activations + max(self.working + self.all_to_all, self.logits)

    @property
    def total(self) -> int:
        return self.state + max(self.temporaries, self.generation)


@dataclasses.dataclass(frozen=True)
class StepTime:
    flops_per_step: float  # model FLOPs (PaLM formula), the basis of MFU
    hardware_flops_per_step: float  # plus the forward recomputed by remat
    peak_tflops: float
    peak_source: str
    mfu: float  # assumed, of model FLOPs
    compute_s: float
    fsdp_s: float  # all-gather weights forward and backward, reduce-scatter gradients
    data_s: float  # all-reduce of gradient shards over the data axis (within a slice)
    tensor_s: float  # per-layer all-reduces of activations
    dcn_s: float  # the part of these collectives that crosses slices
    step_s: float
    tokens_per_s: float
    context_s: float = 0.0  # K/V moved between the devices of mesh.context (all-gather or ring)
    expert_s: float = 0.0  # MoE all-to-alls between the devices of mesh.expert, over ICI ...
    expert_dcn_s: float = 0.0  # ... and the part that crosses slices (an expert axis wider than a slice)


@dataclasses.dataclass(frozen=True)
class Plan:
    recipe: str
    hardware: str
    device: str
    n_devices: int
    slices: int
    mesh: dict[str, int]  # full axis sizes (ICI x DCN)
    dcn: dict[str, int]
    params: int
    params_embedding: int
    params_non_embedding: int
    active_params: int  # what one token passes through: MoE layers count experts_per_token experts
    trainable_params: int
    flops_per_token: float
    tokens_per_step: int
    batch_size: int
    grad_accum: int
    rows_per_device: float  # microbatch rows per device
    remat: str
    groups: tuple[ParamGroup, ...]
    memory: Memory
    capacity_bytes: int
    fits: bool
    max_rows_per_device: dict[str, int]  # largest microbatch rows per device that fit, per remat policy
    chosen_remat: str | None  # the least recompute that fits, None if nothing does
    step: StepTime
    problems: tuple[str, ...]  # divisibility errors, exactly as training would raise them
    notes: tuple[str, ...] = ()
    compiled: dict | None = None  # XLA's memory analysis, where the devices exist

    def summary(self) -> str:
        """One line for a training log: the estimate per device and whether it fits."""
        m, gib = self.memory, 2**30
        return (
            f"memory estimate per device: {m.total / gib:.2f} GiB of {self.capacity_bytes / gib:.2f} GiB usable on "
            f"{self.device} (parameters {m.params / gib:.2f}, optimizer {m.optimizer / gib:.2f}, gradients "
            f"{m.gradients / gib:.2f}, activations and working copies {(m.temporaries - m.gradients) / gib:.2f} "
            f"with remat={self.remat})"
            + ("" if self.fits else f"; does not fit: at most {self.max_rows_per_device[self.remat]} rows per device")
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["memory"].update(state=self.memory.state, temporaries=self.memory.temporaries, total=self.memory.total)
        return d


# ------------------------------------------------------------------------------------------------
# Hardware and mesh


def resolve_hardware(recipe: Recipe, hardware: str | Topology | None = None, devices: int | None = None) -> Topology:
    """The named topology; else `devices` of this machine's kind; else the recipe's own hardware;
    else this machine's devices."""
    if isinstance(hardware, Topology):
        return hardware
    if hardware:
        return topology(hardware)
    if devices is None and getattr(recipe, "hardware", None):
        return topology(recipe.hardware)
    n = devices or jax.device_count()
    kind = jax.devices()[0].device_kind
    dev = device_for_kind(kind)
    return topology(f"{dev.name if dev else 'cpu'} x{n}")


def _peak(device) -> tuple[float, str]:
    if device.peak_tflops:
        return device.peak_tflops, f"data sheet ({device.name})"
    return measure_peak_tflops(), "measured float32 matmul (this CPU)"


def plan_mesh(recipe: Recipe, topo: Topology) -> tuple[AbstractMesh, dict[str, int], list[str]]:
    """The mesh training would build on topo (axis sizes = ICI part x DCN part), without devices."""
    m = recipe.mesh
    dcn = {"data": m.dcn_data, "fsdp": m.dcn_fsdp, "context": 1, "tensor": 1, "expert": 1}
    n_slices = m.dcn_data * m.dcn_fsdp
    notes = []
    if topo.n_devices % n_slices:
        raise UserError(f"{topo.n_devices} devices cannot form mesh.dcn_data*dcn_fsdp={n_slices} slices")
    if n_slices > 1 and n_slices != topo.slices:
        raise UserError(
            f"mesh.dcn_data*dcn_fsdp={n_slices} slices requested but {topo.name} has {topo.slices}; "
            f"plan with --topology '<slice> x{n_slices}' or set them to {topo.slices}"
        )
    if n_slices == 1 and topo.slices > 1:
        notes.append(
            f"{topo.name} has {topo.slices} slices but the mesh has no DCN axis, so some ICI axes cross slices and "
            f"their collectives are timed too fast; set mesh.dcn_data={topo.slices}"
        )
    ici = resolve_shape(m.data, m.fsdp, m.tensor, topo.n_devices // n_slices, m.context, m.expert)
    shape = tuple(i * dcn[a] for i, a in zip(ici, AXES))
    return AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES)), dcn, notes


def divisibility_problems(recipe: Recipe, mesh) -> list[str]:
    """Every indivisible dimension, each as the one-line error training raises for it."""
    layout = Layout(mesh, logical_rules(recipe.mesh.rules))
    problems = []
    for name, dim in recipe.logical_dims().items():
        try:
            check_divisible({name: dim}, layout)
        except UserError as e:
            problems.append(str(e))
    return problems


# ------------------------------------------------------------------------------------------------
# Parameters and optimizer state, from the real model


def abstract_state(recipe: Recipe, mesh):
    """(params, optimizer state) as ShapeDtypeStructs with their shardings under `mesh`."""
    with Layout(mesh, logical_rules(recipe.mesh.rules)):

        def make():
            model = Transformer(recipe.model, rngs=nnx.Rngs(0))
            return model, make_optimizer(model, recipe.optimizer, recipe.train.steps)

        model, optimizer = nnx.eval_shape(make)
        params = nnx.state(model, nnx.Param)
        opt_state = nnx.state(optimizer)
        shardings = nnx.get_named_sharding(params, mesh), nnx.get_named_sharding(opt_state, mesh)
    return (params, opt_state), shardings


def _per_device(shape, spec, mesh_shape) -> int:
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * len(shape)):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= math.ceil(dim / math.prod(mesh_shape[a] for a in axes))
    return n


def _leaves(state, shardings):
    values = jax.tree_util.tree_flatten_with_path(state)[0]
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    for (path, leaf), sharding in zip(values, specs, strict=True):
        if isinstance(path[-1], jax.tree_util.GetAttrKey):  # a Variable's own `.value`
            path = path[:-1]
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        yield ".".join(names), leaf, sharding.spec


def param_groups(params, shardings, mesh_shape, dtype_bytes=None) -> tuple[ParamGroup, ...]:
    groups = []
    for path, leaf, spec in _leaves(params, shardings):
        per_elem = dtype_bytes or leaf.dtype.itemsize
        elems = _per_device(leaf.shape, spec, mesh_shape)
        groups.append(ParamGroup(path, tuple(leaf.shape), str(leaf.dtype), tuple(spec), int(elems * per_elem)))
    return tuple(groups)


def lora_adapter_params(
    groups: tuple[ParamGroup, ...], lora, mesh_shape, stacked: bool = True, routed: float = 1.0
) -> tuple[int, int, int]:
    """(adapter parameters, adapter float32 bytes per device, parameters a token computes with) for the
    kernels LoRA targets; routed: experts_per_token / n_experts, the share of experts a token reaches.

    An adapter on a kernel [in..., out...] is A [in..., rank] and B [rank, out...]; the input side
    is the first dimension, except for the attention output [heads, head_dim, embed]. stacked: the
    layers are scanned, so each kernel has a leading layers axis (model.scan_layers). Expert kernels
    [experts, in, out] get one adapter per expert (lm.lora.ExpertLoRA).
    """
    rank = getattr(lora, "rank", 0)
    targets = getattr(lora, "targets", ()) or ()
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    total = per_device = computed = 0
    for g in groups:
        if not g.path.endswith("kernel") or not g.path.startswith("blocks"):
            continue
        if targets and not any(re.search(t, g.path) for t in targets):
            continue
        layers, dims = (g.shape[0], g.shape[1:]) if stacked else (1, g.shape)
        experts = 1
        if re.search(r"mlp\.(gate|up|down)\.kernel$", g.path) and len(dims) == 3:  # [experts, in, out]: one each
            experts, dims = dims[0], dims[1:]
        split = 2 if g.path.endswith("attn.out.kernel") else 1
        n_in, n_out = math.prod(dims[:split]), math.prod(dims[split:])
        n = layers * experts * rank * (n_in + n_out)
        total += n
        computed += n * (routed if experts > 1 else 1)
        split_ways = math.prod(g.shape) * _bytes(g.dtype) / g.bytes_per_device  # adapters split like the kernel
        per_device += int(n * 4 / split_ways)
    return total, per_device, int(computed)


# ------------------------------------------------------------------------------------------------
# Activations


def compute_dtype_bytes(model: ModelConfig, device_name: str) -> int:
    if model.dtype == "auto":
        return 4 if device_name == "cpu" else 2
    return jnp.dtype(model.dtype).itemsize


def _per_token(c, model: ModelConfig, seq_len: int, tensor: int, context: int = 1) -> float:
    h, kv, hd = model.n_heads, model.n_kv_heads, model.dim_per_head
    tp_heads = tensor if h % tensor == 0 else 1
    tp_mlp = tensor if model.d_ff % tensor == 0 else 1
    # Flash attention (splash, cuDNN) never materializes the [seq, seq] scores: O(seq) memory, not O(seq^2).
    # Context-parallel attention (XLA in each shard) holds each query's scores for KEY_BLOCK keys.
    keys = min(KEY_BLOCK, seq_len / context) if context > 1 else seq_len
    scores = h * keys / tp_heads if model.attention_impl == "xla" or context > 1 else 0.0
    qkvo = (2 * h + 2 * kv) * hd / tp_heads
    return c[0] + c[1] * model.d_model + c[2] * qkvo + c[3] * model.d_ff / tp_mlp + c[4] * scores


def activation_bytes(
    model: ModelConfig, rows: float, seq_len: int, remat: str, tensor: int, act_bytes: int, context: int = 1
) -> tuple[int, int]:
    """(kept by all layers, working set of one layer) in bytes per device, for `rows` sequences of one
    microbatch: rows * seq_len / context * act_bytes * (n_layers * KEPT[remat] . x, WORKING[remat] . x)
    where x = (1, d_model, (2H + 2Hkv) * head_dim / tp, d_ff / tp, H * keys / tp), keys = seq_len
    (the context kernel's key block under mesh.context). mesh.context splits the tokens; allgather's
    working set also holds the layer's K/V gathered whole."""
    tokens = rows * seq_len / context * act_bytes
    kept = model.n_layers * _per_token(KEPT[remat], model, seq_len, tensor, context)
    working = tokens * _per_token(WORKING[remat], model, seq_len, tensor, context)
    if context > 1 and model.context_parallel == "allgather":
        working += rows * seq_len * act_bytes * 2 * model.n_kv_heads * model.dim_per_head / tensor
    return int(tokens * kept), int(working)


def logits_bytes(model: ModelConfig, rows: float, seq_len: int, tensor: int, context: int = 1) -> int:
    """Float32 logits of one microbatch (split over tensor by vocab, over context by position) and
    their gradient. With the chunked loss (model.loss_chunk_for) only one chunk of positions has
    logits at a time."""
    tp = tensor if model.vocab_size % tensor == 0 else 1
    positions = model.loss_chunk_for(seq_len) or seq_len / context
    return int(LOGIT_COPIES * rows * positions * model.vocab_size / tp * 4)


def kv_cache_bytes(model: ModelConfig, length: int, tensor: int, act_bytes: int) -> int:
    """One sequence's KV cache over every layer: 2 x [layers, kv_heads, length, head_dim]."""
    tp = tensor if model.n_kv_heads % tensor == 0 else 1
    return int(2 * model.n_layers * length * model.n_kv_heads / tp * model.dim_per_head * act_bytes)


def all_to_all_bytes(model: ModelConfig, tokens: float, expert: int, act_bytes: int) -> int:
    """One all-to-all buffer of an MoE layer per device under expert parallelism (0 without):
    lm.model.moe.expert_parallel gives every peer room for all of a device's `tokens` x
    experts_per_token assignments, [expert, tokens * k, d_model] (XLA:CPU has no ragged all-to-all)."""
    if not model.n_experts or expert <= 1:
        return 0
    return int(expert * tokens * model.experts_per_token * model.d_model * act_bytes)


# Buffers of one MoE layer alive together: the dispatch sent and received, the results sent back.
ALL_TO_ALL_BUFFERS = 3


# ------------------------------------------------------------------------------------------------
# Time


def step_time(
    recipe: Recipe,
    topo: Topology,
    mesh_shape: dict[str, int],
    dcn: dict[str, int],
    weight_bytes: float,
    grad_bytes: float,
    act_bytes: int,
    mfu: float | None = None,
    peak_tflops: float | None = None,
    adapter_params: int | None = None,
) -> StepTime:
    """FLOPs at an MFU, plus collectives at the interconnect's bandwidth.

    weight_bytes: one full copy of the weights as the step gathers them (compute dtype, split only by
    tensor); grad_bytes: a device's gradient shard. FSDP and data-parallel collectives overlap with
    compute (XLA schedules them asynchronously); tensor-parallel all-reduces sit on the critical path.
    """
    m, t, dev = recipe.model, recipe.train, topo.device
    tokens = t.batch_size * t.seq_len
    flops = m.flops_per_token(t.seq_len, adapter_params=adapter_params) * tokens
    # Remat recomputes part of the forward pass (a third of the training FLOPs): all of it under
    # `full`, the attention score matmuls under `dots_no_batch`, nothing that is a matmul under `dots`.
    attn_fwd = 4 * m.n_layers * t.seq_len * m.n_heads * m.dim_per_head * tokens
    layer_fwd = 2 * (m.n_active_params - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)) * tokens + attn_fwd
    recompute = {"none": 0.0, "dots": 0.0, "dots_no_batch": attn_fwd, "full": layer_fwd}[m.remat]
    peak, source = (peak_tflops, "given") if peak_tflops else _peak(dev)
    mfu = mfu or dev.mfu
    n = topo.n_devices
    compute_s = (flops + recompute) / (n * peak * 1e12 * mfu)

    def ring(size, payload, bandwidth, reduce=False):
        """Seconds for an all-gather/reduce-scatter (all-reduce: twice) of payload bytes over size devices."""
        return 0.0 if size <= 1 else (2 if reduce else 1) * (size - 1) / size * payload / bandwidth

    k = t.grad_accum
    fs_ici, fs_dcn = mesh_shape["fsdp"] // dcn["fsdp"], dcn["fsdp"]
    da_ici, da_dcn = mesh_shape["data"] // dcn["data"], dcn["data"]

    # Per microbatch: gather the weights for the forward and again for the backward, reduce-scatter
    # the gradients (float32) back to their shards.
    def fsdp(size, bandwidth):
        return k * (2 * ring(size, weight_bytes, bandwidth) + ring(size, grad_bytes * size, bandwidth))

    fsdp_ici, fsdp_dcn = fsdp(fs_ici, dev.ici_bytes_per_s), fsdp(fs_dcn, dev.dcn_bytes_per_s)
    data_s = ring(da_ici, grad_bytes, dev.ici_bytes_per_s, reduce=True)
    dcn_s = fsdp_dcn + ring(da_dcn, grad_bytes, dev.dcn_bytes_per_s, reduce=True)
    rows = t.batch_size / k / (mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["expert"])
    tp = mesh_shape["tensor"]
    # Megatron-style: two all-reduces of [rows, seq, d_model] per layer forward, two backward.
    activation = rows * t.seq_len / mesh_shape.get("context", 1) * m.d_model * act_bytes
    tensor_s = k * m.n_layers * 4 * ring(tp, activation, dev.ici_bytes_per_s, reduce=True)
    # Context parallelism: per layer, K/V of the whole sequence reach every device of mesh.context in
    # the forward pass (twice under remat, whose recompute runs it again), again in the backward pass
    # (which keeps only the shard's own K/V), and their gradients go back in float32 (the same bytes
    # for both modes). The all-gather waits on the critical path; the ring sends the next block while
    # attending this one.
    cp = mesh_shape.get("context", 1)
    kv = rows * t.seq_len * 2 * m.n_kv_heads * m.dim_per_head / (tp if m.n_kv_heads % tp == 0 else 1) * act_bytes
    passes = (2 if m.remat != "none" else 1) + 1 + 4 / act_bytes
    context_s = k * m.n_layers * passes * ring(cp, kv, dev.ici_bytes_per_s)
    overlapped = context_s if m.context_parallel == "ring" else 0.0
    # Expert parallelism: per MoE layer, an all-to-all to the experts and one back in the forward pass
    # and the same two in the backward; the experts wait for them (on the critical path). Each device
    # keeps 1/expert of a buffer and sends the rest, over DCN to the peers outside its slice when the
    # expert axis (the innermost) is wider than a slice.
    ep = mesh_shape["expert"]
    buffer = all_to_all_bytes(m, rows * t.seq_len / mesh_shape.get("context", 1), ep, act_bytes)
    per_slice = topo.n_devices // topo.slices
    dcn_peers = max(0, ep - per_slice) if math.prod(dcn.values()) == 1 else 0
    sent = 4 * k * sum(m.moe_layers) * buffer / max(ep, 1)  # bytes to each peer, per step
    expert_s = sent * (ep - 1 - dcn_peers) / dev.ici_bytes_per_s
    expert_dcn_s = sent * dcn_peers / dev.dcn_bytes_per_s
    step_s = max(compute_s, fsdp_ici + data_s + dcn_s + overlapped) + tensor_s + (context_s - overlapped)
    step_s += expert_s + expert_dcn_s
    return StepTime(
        flops_per_step=flops,
        hardware_flops_per_step=flops + recompute,
        peak_tflops=peak,
        peak_source=source,
        mfu=mfu,
        compute_s=compute_s,
        fsdp_s=fsdp_ici,
        data_s=data_s,
        tensor_s=tensor_s,
        context_s=context_s,
        expert_s=expert_s,
        expert_dcn_s=expert_dcn_s,
        dcn_s=dcn_s,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
    )


# ------------------------------------------------------------------------------------------------
# The plan


def _max_rows(
    m: ModelConfig, seq_len: int, remat: str, tp: int, act_bytes: int, free: float, cp: int = 1, ep: int = 1
) -> int:
    """How many rows per device fit in `free` bytes: activations, logits and all-to-all buffers are
    linear in the rows."""
    kept, working = activation_bytes(m, 1, seq_len, remat, tp, act_bytes, cp)
    working += ALL_TO_ALL_BUFFERS * all_to_all_bytes(m, seq_len / cp, ep, act_bytes)
    return max(0, int(free // (kept + max(working, logits_bytes(m, 1, seq_len, tp, cp)))))


def estimate(
    recipe: Recipe,
    hardware: str | Topology | None = None,
    devices: int | None = None,
    *,
    mfu: float | None = None,
    peak_tflops: float | None = None,
) -> Plan:
    """Plan `recipe` on a topology ('v5p-128', 'h100-80gb x8', ...), or on `devices` devices of this
    machine's kind, or on the recipe's own `hardware`. Raises UserError for a mesh that cannot be built."""
    topo = resolve_hardware(recipe, hardware, devices)
    mesh, dcn, notes = plan_mesh(recipe, topo)
    recipe = recipe.with_batch_for(mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"])
    mesh_shape = dict(mesh.shape)
    m, t = recipe.model, recipe.train
    problems = divisibility_problems(recipe, mesh)

    (params, opt_state), (p_sh, o_sh) = abstract_state(recipe, mesh)
    groups = param_groups(params, p_sh, mesh_shape)
    opt_groups = param_groups(opt_state, o_sh, mesh_shape)
    # The routed experts' kernels: the parameters whose logical axes name the expert dimension.
    expert_paths = tuple(
        ".".join(map(str, path))
        for path, var in nnx.to_flat_state(params)
        if "expert" in (var.get_metadata().get("out_sharding") or ())
    )
    act_bytes = compute_dtype_bytes(m, topo.device.name)
    tp = mesh_shape["tensor"]

    n_params = sum(math.prod(g.shape) for g in groups)
    embedding = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    embedding += m.max_seq_len * m.d_model if m.positions == "learned" else 0
    param_bytes = sum(g.bytes_per_device for g in groups)
    opt_bytes = sum(g.bytes_per_device for g in opt_groups)
    grad_copies = 2 if t.grad_accum > 1 else 1  # the float32 accumulator beside each microbatch's gradients
    grad_bytes = param_bytes * grad_copies
    trainable = n_params
    # Weights as the step gathers them: one full copy split only by tensor, in the compute dtype.
    gathered_copy = n_params * act_bytes / tp
    lora = recipe.lora
    if lora.rank:
        routed = m.experts_per_token / m.n_experts if m.n_experts else 1.0
        trainable, adapter_bytes, computed = lora_adapter_params(groups, lora, mesh_shape, m.scan_layers, routed)
        base = sum(g.bytes_per_device / jnp.dtype(g.dtype).itemsize * _bytes(lora.base_dtype) for g in groups)
        param_bytes = int(base) + adapter_bytes
        opt_bytes, grad_bytes = 2 * adapter_bytes, adapter_bytes * grad_copies
        notes.append(
            f"LoRA rank {lora.rank}: base weights in {lora.base_dtype}, Adam state and gradients for the adapters only"
        )
    gathered = 0
    if mesh_shape["fsdp"] > 1:
        # FSDP gathers one layer's weights at a time (two in flight: the one in use and the next);
        # the lookup gathers the table's width, so its gradient is formed whole before the reduce-scatter.
        vocab_tp = tp if m.vocab_size % tp == 0 else 1
        gathered = int(2 * gathered_copy / m.n_layers)
        gathered += int(m.vocab_size * m.d_model * jnp.dtype(m.param_dtype).itemsize / vocab_tp)

    # dpo/grpo's reference: a LoRA run's base (adapters off) is no second copy; a full fine-tune keeps its
    # starting weights, sharded like the policy, and a folder (objective.reference) is counted at the
    # policy's size. Its forward pass keeps no activations.
    reference = 0
    if t.objective != "sft" and (not lora.rank or recipe.objective.reference != "base"):
        reference = sum(g.bytes_per_device for g in groups)
        notes.append(
            "the reference model is a frozen copy of the weights in "
            f"{m.param_dtype}" + ("" if recipe.objective.reference == "base" else ", counted at the policy's size")
        )
    # dpo: each pair is two rows (chosen, rejected).
    pair_rows = 2 if t.objective == "dpo" else 1
    batch_split = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["expert"]
    rows = pair_rows * t.batch_size / t.grad_accum / batch_split
    cp = mesh_shape["context"]
    logits = logits_bytes(m, rows, t.seq_len, tp, cp)
    acts = {r: activation_bytes(m, rows, t.seq_len, r, tp, act_bytes, cp) for r in REMATS}
    all_to_all = ALL_TO_ALL_BUFFERS * all_to_all_bytes(m, rows * t.seq_len / cp, mesh_shape["expert"], act_bytes)
    by_remat = {r: kept + max(working + all_to_all, logits) for r, (kept, working) in acts.items()}
    memory = Memory(
        params=int(param_bytes),
        optimizer=int(opt_bytes),
        gradients=int(grad_bytes),
        gathered=gathered,
        activations=acts[m.remat][0],
        working=acts[m.remat][1],
        logits=logits,
        activations_by_remat=by_remat,
        kv_cache_per_sequence=kv_cache_bytes(m, m.max_seq_len, tp, act_bytes),
        experts=sum(g.bytes_per_device for g in groups + opt_groups if g.path.endswith(expert_paths))
        if expert_paths
        else 0,
        all_to_all=all_to_all,
        # grpo samples train.batch_size completions at once, each at most train.seq_len with its prompt,
        # in a cache of the next power of two (lm.infer.decode.bucket).
        generation=int(rows * kv_cache_bytes(m, min(1 << (t.seq_len - 1).bit_length(), m.max_seq_len), tp, act_bytes))
        if t.objective == "grpo"
        else 0,
        reference=int(reference),
    )
    capacity = int(topo.device.hbm_bytes * USABLE_FRACTION)
    fixed = memory.state + memory.gradients + memory.gathered
    free = capacity - fixed
    max_rows = {r: _max_rows(m, t.seq_len, r, tp, act_bytes, free, cp, mesh_shape["expert"]) for r in REMATS}
    chosen = next((r for r in REMATS if fixed + by_remat[r] <= capacity), None)

    grad_shard = grad_bytes / grad_copies
    adapters = computed if lora.rank else None
    step = step_time(recipe, topo, mesh_shape, dcn, gathered_copy, grad_shard, act_bytes, mfu, peak_tflops, adapters)
    return Plan(
        recipe=recipe.name,
        hardware=topo.name,
        device=topo.device.name,
        n_devices=topo.n_devices,
        slices=topo.slices,
        mesh=mesh_shape,
        dcn=dcn,
        params=n_params,
        params_embedding=embedding,
        params_non_embedding=n_params - embedding,
        active_params=n_params - (m.n_params - m.n_active_params),
        trainable_params=trainable,
        flops_per_token=m.flops_per_token(t.seq_len, adapter_params=adapters),
        tokens_per_step=t.batch_size * t.seq_len,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        rows_per_device=rows,
        remat=m.remat,
        groups=groups,
        memory=memory,
        capacity_bytes=capacity,
        fits=memory.total <= capacity,
        max_rows_per_device=max_rows,
        chosen_remat=chosen,
        step=step,
        problems=tuple(problems),
        notes=tuple(notes),
    )
