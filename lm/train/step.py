"""The jitted train and eval steps. Sharding comes from the arrays and the mesh context, not from here."""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.kernels.context import balance
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
    batch = balance(batch)  # zig-zag order where mesh.context splits the sequence
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


@functools.partial(nnx.jit, static_argnames=("grad_accum",), donate_argnames=("model", "optimizer"))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, grad_accum: int = 1) -> dict:
    """One optimizer step on a global batch, optionally as `grad_accum` microbatches.

    The batch's total token weight is known before the forward pass, so each microbatch
    differentiates its summed loss divided by that total: the gradients come out as the batch mean
    (accumulated in float32), equal to the single-big-batch update, with no separate pass over
    them to divide. Only the optimizer's `wrt` parameters (all Params, or just the LoRA adapters)
    are differentiated; the rest is constant.
    """
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
    # Plain arrays, so that merging makes fresh Variables inside the gradient trace: nnx.scan refuses
    # Variables of an enclosing trace, and a LoRA run's frozen base weights live in `rest`.
    frozen = nnx.as_pure(rest)

    # LoRA dropout (if any) draws from the step number: a resumed run draws the same masks.
    step_key = jax.random.fold_in(jax.random.key(0), optimizer.step[...])
    total_weight = jnp.maximum(batch["weights"].sum(dtype=jnp.float32), 1.0)

    cfg = model.cfg

    def mean_and_grads(mb, i=0):
        """((this microbatch's share of the loss, its share of the router metrics), gradients)."""

        def loss(p):
            model_i = nnx.merge(graphdef, compute_params(p, cfg.compute_dtype), frozen)
            seed_dropout(model_i, jax.random.fold_in(step_key, i))
            loss_sum, _, stats = _loss_sums(model_i, mb)
            router = jax.tree.map(lambda x: x / grad_accum, router_metrics(stats))
            # The router losses are per-token means, so each microbatch adds its 1/grad_accum share.
            objective = loss_sum / total_weight
            if router:
                objective += cfg.router_aux_loss * router["aux_loss"] + cfg.router_z_loss * router["z_loss"]
            return objective, (loss_sum / total_weight, router)

        (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return aux, grads

    if grad_accum == 1:
        (loss, router), grads = mean_and_grads(batch)
    else:

        def body(acc, mb_i):
            return jax.tree.map(jnp.add, acc, mean_and_grads(*mb_i)), None

        shapes = jax.eval_shape(lambda: mean_and_grads(batch)[0])  # the metrics' shapes, not a real pass
        zeros = (
            jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes),
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        )
        xs = (_microbatches(batch, grad_accum), jnp.arange(grad_accum))
        ((loss, router), grads), _ = jax.lax.scan(body, zeros, xs)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return {
        "loss": loss,  # the cross-entropy; the objective also adds the weighted router losses
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(nnx.state(model, optimizer.wrt)),
        **router,
    }


@functools.partial(nnx.jit, static_argnames=("beta", "loss_type"), donate_argnames=("model", "optimizer"))
def dpo_train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, beta: float, loss_type: str) -> dict:
    """One optimizer step of DPO (train.objective=dpo) on a pair batch, chosen rows then rejected
    (lm.data.preference.pair_batch), against the reference of a LoRA run: the base, adapters off.

    The reference pass runs first and carries no gradient; the policy pass differentiates only the
    optimizer's `wrt` parameters, as train_step does. Returns train_step's metrics plus the DPO
    reward metrics (rewards_chosen, rewards_rejected, reward_margin, reward_accuracy)."""
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
    frozen = nnx.as_pure(rest)
    dtype = model.cfg.compute_dtype
    reference = nnx.merge(graphdef, compute_params(params, dtype), frozen)
    ref_logps = (reference_token_logps(reference, batch) * batch["weights"]).sum(-1)

    def loss(p):
        # No adapter dropout: TRL's DPOTrainer turns dropout off by default (disable_dropout=True).
        policy = nnx.merge(graphdef, compute_params(p, dtype), frozen)
        return dpo_objective(policy, batch, ref_logps, beta=beta, loss_type=loss_type)

    (loss, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(nnx.state(model, optimizer.wrt)),
        **metrics,
    }


@nnx.jit
def eval_step(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed loss and token weight of one batch (the caller averages over batches)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _loss_sums(nnx.merge(graphdef, compute_params(params, model.cfg.compute_dtype), rest), batch)[:2]


@functools.partial(
    nnx.jit, static_argnames=("beta", "epsilon", "temperature", "loss_type"), donate_argnames=("model", "optimizer")
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
) -> dict:
    """One optimizer step of GRPO (train.objective=grpo) on a rollout's completion batch
    (lm.train.objectives.rollout): the clipped surrogate with the k3 KL penalty, per completion token.
    Returns train_step's metrics plus kl (when beta > 0) and clip_fraction."""
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
    frozen = nnx.as_pure(rest)
    step_key = jax.random.fold_in(jax.random.key(0), optimizer.step[...])

    def loss(p):
        policy = nnx.merge(graphdef, compute_params(p, model.cfg.compute_dtype), frozen)
        seed_dropout(policy, step_key)
        logps = token_logps(policy, batch, temperature)
        return grpo_loss(
            logps, old_logps, ref_logps, advantages, batch["weights"], beta=beta, epsilon=epsilon, loss_type=loss_type
        )

    (loss, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(nnx.state(model, optimizer.wrt)),
        **metrics,
    }
