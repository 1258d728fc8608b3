"""The jitted train and eval steps. Sharding comes from the arrays and the mesh context, not from here."""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.kernels.context import balanced
from lm.lora import seed_dropout
from lm.loss import chunked_cross_entropy_sum, cross_entropy_sum
from lm.model.moe import RouterStats, aux_loss, z_loss
from lm.train.objectives import dpo_objective, grpo_loss, reference_token_logps, token_logps
from sharding.rules import logical_constraint


def compute_params(params, dtype):
    """Matmul weights (kernels, embedding tables) cast to the compute dtype while still sharded.

    The layers would cast them anyway, but after FSDP's all-gather, which then moves float32. The
    sharding constraint pins the cast to the parameter's own layout, so the gathers move half the
    bytes. Norm scales and biases are small and stay as they are. Differentiating through the cast
    keeps the gradients in the parameters' own dtype.
    """

    def cast(path, var):
        if path[-1].key not in ("kernel", "embedding"):
            return var
        names = var.get_metadata().get("out_sharding")
        value = var.get_value().astype(dtype)
        return var.replace(logical_constraint(value, names) if names else value)

    return jax.tree_util.tree_map_with_path(cast, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _loss_sums(model, batch) -> tuple[jax.Array, jax.Array, RouterStats | None]:
    """(summed loss, summed weight, the MoE layers' RouterStats or None)."""
    with balanced(batch) as batch:  # zig-zag order where mesh.context splits the sequence (attention is told)
        chunk = model.cfg.loss_chunk_for(batch["tokens"].shape[1])
        inputs = (batch["tokens"], batch["positions"], batch["segment_ids"])
        if chunk:  # large vocabularies: never materialise [batch, length, vocab] logits
            hidden, stats = model(*inputs, return_hidden=True, return_router=True)
            sums = chunked_cross_entropy_sum(
                hidden, model.head(), batch["targets"], batch["weights"], chunk, model.cfg.final_softcap
            )
            return *sums, stats
        logits, stats = model(*inputs, return_router=True)
        return *cross_entropy_sum(logits, batch["targets"], batch["weights"]), stats


def router_metrics(stats: RouterStats | None) -> dict:
    """What a log step shows of the routing: the load-balancing and z losses (before their
    coefficients) and, per MoE layer, the busiest expert's share of assignments over the mean share
    (1 = perfectly balanced) and the fraction of assignments dropped by the capacity."""
    if stats is None:
        return {}
    return {
        "aux_loss": aux_loss(stats),
        "z_loss": z_loss(stats),
        "expert_load_max_over_mean": stats.load.max(-1) / stats.load.mean(-1),
        "dropped": stats.dropped,
    }


def _microbatches(batch, k: int):
    """[batch, ...] -> [k, batch/k, ...], microbatch i taking rows i, i+k, i+2k, ...

    Strided rows keep every microbatch spread over all data-parallel devices (each device's
    contiguous block of rows holds a slice of every microbatch), so no rows move between devices.
    """

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def _optimizer_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, grad_accum: int, objective) -> dict:
    """The step every objective shares: differentiate `objective(policy, microbatch, i) -> (value,
    metrics)` with respect to the optimizer's `wrt` parameters (all Params, or just the LoRA adapters;
    the rest is constant), over `grad_accum` microbatches (lm.train.step._microbatches), then update.

    Each microbatch's value and metrics must be its share of the batch's (divided by the batch total,
    not its own), so sums over microbatches, accumulated in float32, equal the single-big-batch
    numbers. `policy` is a fresh merge with the weights cast to the compute dtype."""
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
    # Plain arrays, so that merging makes fresh Variables inside the gradient trace: nnx.scan refuses
    # Variables of an enclosing trace, and a LoRA run's frozen base weights live in `rest`.
    frozen = nnx.as_pure(rest)
    dtype = model.cfg.compute_dtype

    def metrics_and_grads(mb, i=0):
        def value(p):
            return objective(nnx.merge(graphdef, compute_params(p, dtype), frozen), mb, i)

        (_, metrics), grads = jax.value_and_grad(value, has_aux=True)(params)
        return metrics, grads

    if grad_accum == 1:
        metrics, grads = metrics_and_grads(batch)
    else:

        def body(acc, mb_i):
            return jax.tree.map(jnp.add, acc, metrics_and_grads(*mb_i)), None

        shapes = jax.eval_shape(lambda: metrics_and_grads(batch)[0])  # the metrics' shapes, not a real pass
        zeros = (
            jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes),
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        )
        xs = (_microbatches(batch, grad_accum), jnp.arange(grad_accum))
        (metrics, grads), _ = jax.lax.scan(body, zeros, xs)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return {**metrics, "grad_norm": grad_norm, "param_norm": optax.tree.norm(nnx.state(model, optimizer.wrt))}


@functools.partial(nnx.jit, static_argnames=("grad_accum",), donate_argnames=("model", "optimizer"))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, grad_accum: int = 1) -> dict:
    """One optimizer step on a global batch, optionally as `grad_accum` microbatches.

    The batch's total token weight is known before the forward pass, so each microbatch
    differentiates its summed loss divided by that total: the gradients come out as the batch mean,
    equal to the single-big-batch update, with no separate pass over them to divide. `loss` is the
    cross-entropy; the objective also adds the weighted router losses of MoE models.
    """
    # LoRA dropout (if any) draws from the step number: a resumed run draws the same masks.
    step_key = jax.random.fold_in(jax.random.key(0), optimizer.step[...])
    total_weight = jnp.maximum(batch["weights"].sum(dtype=jnp.float32), 1.0)
    cfg = model.cfg

    def objective(policy, mb, i):
        seed_dropout(policy, jax.random.fold_in(step_key, i))
        loss_sum, _, stats = _loss_sums(policy, mb)
        # The router losses are per-token means, so each microbatch adds its 1/grad_accum share.
        router = jax.tree.map(lambda x: x / grad_accum, router_metrics(stats))
        value = loss_sum / total_weight
        if router:
            value += cfg.router_aux_loss * router["aux_loss"] + cfg.router_z_loss * router["z_loss"]
        return value, {"loss": loss_sum / total_weight, **router}

    return _optimizer_step(model, optimizer, batch, grad_accum, objective)


def compute_view(model: nnx.Module) -> nnx.Module:
    """The model with its weights cast to the compute dtype, as the train step runs it (no gradient)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, compute_params(params, model.cfg.compute_dtype), rest)


def _pairs(batch: dict, to_pairs: bool) -> dict:
    """A pair batch's rows, chosen first then rejected [2P, ...], as [P, 2, ...] (to_pairs) and back,
    so that microbatches split pairs, never a pair."""

    def move(x):
        if to_pairs:
            return x.reshape(2, x.shape[0] // 2, *x.shape[1:]).swapaxes(0, 1)
        return x.swapaxes(0, 1).reshape(2 * x.shape[0], *x.shape[2:])

    return jax.tree.map(move, batch)


@functools.partial(nnx.jit, static_argnames=("beta", "loss_type", "grad_accum"), donate_argnames=("model", "optimizer"))
def dpo_train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: dict,
    reference: nnx.Module | None = None,
    *,
    beta: float,
    loss_type: str,
    grad_accum: int = 1,
) -> dict:
    """One optimizer step of DPO (train.objective=dpo) on a pair batch, chosen rows then rejected
    (lm.data.preference.pair_batch), optionally as `grad_accum` microbatches of whole pairs.

    reference: the frozen reference model (a full fine-tune's initial weights, or a folder's); None for
    a LoRA run's base, the policy itself with its adapters off. Its pass carries no gradient. Returns
    train_step's metrics plus the DPO reward metrics (rewards_chosen, rewards_rejected, reward_margin,
    reward_accuracy), all means over the batch's pairs."""
    # Plain arrays, merged inside the gradient trace (as _optimizer_step does with the frozen weights).
    ref_graphdef, ref_state = nnx.split(reference) if reference is not None else (None, None)
    ref_state = nnx.as_pure(ref_state)

    def objective(policy, mb, i):
        # No adapter dropout: TRL's DPOTrainer turns dropout off by default (disable_dropout=True).
        mb = _pairs(mb, to_pairs=False) if grad_accum > 1 else mb
        ref = None if reference is None else compute_view(nnx.merge(ref_graphdef, ref_state))
        ref_logps = (reference_token_logps(policy, mb, reference=ref) * mb["weights"]).sum(-1)
        loss, metrics = dpo_objective(policy, mb, ref_logps, beta=beta, loss_type=loss_type)
        return loss / grad_accum, jax.tree.map(lambda x: x / grad_accum, {"loss": loss, **metrics})

    pairs = _pairs(batch, to_pairs=True) if grad_accum > 1 else batch
    return _optimizer_step(model, optimizer, pairs, grad_accum, objective)


@nnx.jit
def eval_step(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed loss and token weight of one batch (the caller averages over batches)."""
    return _loss_sums(compute_view(model), batch)[:2]


@functools.partial(
    nnx.jit,
    static_argnames=("beta", "epsilon", "temperature", "loss_type", "grad_accum"),
    donate_argnames=("model", "optimizer"),
)
def grpo_train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: dict,
    old_logps: jax.Array,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    *,
    beta: float,
    epsilon: float,
    temperature: float,
    loss_type: str,
    grad_accum: int = 1,
) -> dict:
    """One optimizer step of GRPO (train.objective=grpo) on a rollout's completion batch
    (lm.train.objectives.rollout): the clipped surrogate with the k3 KL penalty, per completion token,
    optionally as `grad_accum` microbatches of completions. Returns train_step's metrics plus kl (when
    beta > 0) and clip_fraction, per-token means over the batch."""
    step_key = jax.random.fold_in(jax.random.key(0), optimizer.step[...])
    tokens = jnp.maximum(batch["weights"].sum(dtype=jnp.float32), 1.0)
    rows = {**batch, "old_logps": old_logps, "advantages": advantages}
    if ref_logps is not None:
        rows["ref_logps"] = ref_logps

    def objective(policy, mb, i):
        seed_dropout(policy, jax.random.fold_in(step_key, i))
        logps = token_logps(policy, mb, temperature)
        loss, metrics = grpo_loss(
            logps, mb["old_logps"], mb.get("ref_logps"), mb["advantages"], mb["weights"], beta=beta,
            epsilon=epsilon, loss_type=loss_type, total_tokens=tokens,
        )  # fmt: skip
        if loss_type != "dapo":  # a mean over completions; dapo's divisor is already the batch's tokens
            loss = loss / grad_accum
        # kl and clip_fraction are means over this microbatch's tokens: weigh them by its share.
        share = jnp.maximum(mb["weights"].sum(dtype=jnp.float32), 1.0) / tokens
        return loss, {"loss": loss, **jax.tree.map(lambda x: x * share, metrics)}

    return _optimizer_step(model, optimizer, rows, grad_accum, objective)
