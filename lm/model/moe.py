"""Routing and dispatch of the mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE; the module is
`lm.model.blocks.MoE`): a router picks experts_per_token of n_experts gated MLPs per token.

Routing, as transformers does it for all three: softmax over all experts in float32, the top k,
renormalised to sum to 1 when router_norm_topk (Mixtral's softmax over the top-k logits is the same
numbers). Two dispatches compute the same layer:
  dropless (capacity_factor None)  assignments sorted by expert, grouped matmuls
                                   (`lm.kernels.grouped_matmul`); no [tokens, experts, ...] tensor.
  expert-parallel (dropless on a mesh whose `expert` rule splits the experts): inside shard_map,
                                   assignments travel to their experts' devices by all_to_all, are
                                   multiplied there by grouped matmuls, and travel back.
  capacity (capacity_factor set)   one-hot [tokens, experts, capacity] dispatch and combine einsums;
                                   assignments past an expert's capacity are dropped (GShard).
Each expert projection arrives as ExpertWeights: its kernel, and with a LoRA adapter on the experts
(lm.lora) the per-expert low-rank factors, applied by the same grouped matmuls or einsums.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.config import ModelConfig
from lm.kernels import grouped_matmul
from sharding.rules import current_rules, logical_to_spec


class RouterStats(NamedTuple):
    """One MoE layer's routing figures over its real tokens (segment id > 0); stacked over layers.

    load: [experts] assignments per expert over tokens (sums to experts_per_token); probs: [experts]
    mean router probability; z: mean squared logsumexp of the router logits; dropped: the fraction
    of assignments past an expert's capacity (0 when dropless)."""

    load: jax.Array
    probs: jax.Array
    z: jax.Array
    dropped: jax.Array


def aux_loss(stats: RouterStats) -> jax.Array:
    """The load-balancing loss as transformers' load_balancing_loss_func computes it: the layers'
    router outputs pooled (means over layers and tokens), experts * sum(load * probs)."""
    n_experts = stats.load.shape[-1]
    return n_experts * jnp.sum(stats.load.mean(0) * stats.probs.mean(0))


def z_loss(stats: RouterStats) -> jax.Array:
    """ST-MoE's router z-loss, mean(logsumexp(logits) ** 2), averaged over layers."""
    return stats.z.mean()


def route(logits: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 router logits [n, experts] -> (probs [n, experts], weights [n, k], experts int [n, k])."""
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.router_norm_topk:
        weights = weights / weights.sum(-1, keepdims=True)
    return probs, weights, experts


class ExpertWeights(NamedTuple):
    """One expert projection: kernel [experts, in, out] and, with an adapter, a [experts, in, rank]
    and b [experts, rank, out] already scaled by alpha / rank: expert e computes x W_e + (x a_e) b_e."""

    kernel: jax.Array
    a: jax.Array | None = None
    b: jax.Array | None = None


def grouped_project(rows, w: ExpertWeights, sizes, impl: str):
    """rows [n, in] sorted by expert (sizes [experts]) -> [n, out]; the adapter takes two more grouped
    matmuls through its rank, so no [n, in, out] or [experts, in, out] delta is ever formed."""
    y = grouped_matmul(rows, w.kernel, sizes, impl=impl)
    if w.a is not None:
        y = y + grouped_matmul(grouped_matmul(rows, w.a, sizes, impl=impl), w.b, sizes, impl=impl)
    return y


def batched_project(xe, w: ExpertWeights):
    """xe [experts, capacity, in] -> [experts, capacity, out] (the capacity dispatch's einsums)."""
    y = jnp.einsum("eci,eio->eco", xe, w.kernel)
    if w.a is not None:
        y = y + jnp.einsum("ecr,ero->eco", jnp.einsum("eci,eir->ecr", xe, w.a), w.b)
    return y


def _activation(cfg: ModelConfig):
    return jax.nn.silu if cfg.mlp == "swiglu" else lambda h: jax.nn.gelu(h, approximate=True)


def grouped_experts(rows, kernels: tuple[ExpertWeights, ...], sizes, cfg: ModelConfig):
    """The gated MLP of each group's expert on rows [n, d] sorted by expert (sizes [experts])."""
    gate, up, down = (functools.partial(grouped_project, w=w, sizes=sizes, impl=cfg.moe_impl) for w in kernels)
    return down(_activation(cfg)(gate(rows)) * up(rows))


def dropless(tokens, experts, weights, kernels, cfg: ModelConfig):
    """tokens [n, d], experts/weights [n, k] -> [n, d]: every assignment computed, by grouped matmuls
    over the assignments sorted by expert."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignment slots grouped by expert
    rows = tokens[order // k]  # [n * k, d]
    sizes = jnp.bincount(flat, length=cfg.n_experts).astype(jnp.int32)
    out = grouped_experts(rows, kernels, sizes, cfg)  # [n * k, d], in sorted order
    out = out[jnp.argsort(order)].reshape(n, k, -1)  # back to [token, slot]
    return jnp.einsum("nkd,nk->nd", out, weights)


def expert_devices() -> int:
    """How many ways the enclosing mesh and rules split the experts (1: no expert parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not current_rules():
        return 1
    axes = logical_to_spec(("expert",))[0]
    axes = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(mesh.shape[a] for a in axes)


def expert_parallel(tokens, experts, weights, kernels, cfg: ModelConfig):
    """dropless() with the experts split over the mesh's expert axis, inside shard_map.

    Each device routes its own tokens (the batch is split over the expert axis too), sends every
    assignment to the device that holds its expert (all_to_all), runs its local experts with grouped
    matmuls, and sends the results back. XLA:CPU has no ragged_all_to_all, so each device sends a
    buffer with room for all its assignments to every peer: exact (nothing is ever dropped) at the
    cost of expert_devices times the bytes. The expert kernels arrive split by experts (and by tensor
    along their hidden width, summed with a psum); an fsdp split is gathered by the caller's GSPMD.
    """
    mesh = jax.sharding.get_abstract_mesh()
    row = logical_to_spec(("batch", None))
    expert_axes = logical_to_spec(("expert",))[0]
    hidden_axes = logical_to_spec(("expert_mlp",))[0]

    def spec(w: ExpertWeights, in_axes, out_axes) -> ExpertWeights:
        """The adapter's rank axis is whole on every device; its other axes split as the kernel's."""
        lora = w.a is not None
        return ExpertWeights(P(expert_axes, in_axes, out_axes), *(
            (P(expert_axes, in_axes, None), P(expert_axes, None, out_axes)) if lora else (None, None)))  # fmt: skip

    ep = expert_devices()
    local_experts = cfg.n_experts // ep

    def local(tokens, experts, weights, gate, up, down):
        n, k = experts.shape
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        dest = flat[order] // local_experts  # the device each sorted assignment goes to
        start = jnp.searchsorted(dest, jnp.arange(ep), side="left")  # first sorted slot per device
        slot = jnp.arange(n * k) - start[dest]  # its row in that device's part of the buffer
        send = jnp.zeros((ep, n * k, tokens.shape[-1]), tokens.dtype).at[dest, slot].set(tokens[order // k])
        # The local expert of each sent row; rows never filled say local_experts (in no group).
        ids = jnp.full((ep, n * k), local_experts, jnp.int32).at[dest, slot].set(flat[order] % local_experts)
        recv = jax.lax.all_to_all(send, expert_axes, 0, 0, tiled=True).reshape(ep * n * k, -1)
        recv_ids = jax.lax.all_to_all(ids, expert_axes, 0, 0, tiled=True).reshape(-1)
        by_expert = jnp.argsort(recv_ids, stable=True)
        rows = recv[by_expert]
        sizes = jnp.bincount(recv_ids, length=local_experts + 1)[:local_experts].astype(jnp.int32)
        out = grouped_experts(rows, (gate, up, down), sizes, cfg)
        if hidden_axes is not None:  # each device summed over its part of the hidden width (and the adapter's a)
            out = jax.lax.psum(out, hidden_axes)
        out = out[jnp.argsort(by_expert)].reshape(ep, n * k, -1)
        back = jax.lax.all_to_all(out, expert_axes, 0, 0, tiled=True)
        mine = back[dest, slot][jnp.argsort(order)].reshape(n, k, -1)
        return jnp.einsum("nkd,nk->nd", mine, weights)

    gate, up, down = kernels
    specs = (spec(gate, None, hidden_axes), spec(up, None, hidden_axes), spec(down, hidden_axes, None))
    return jax.shard_map(local, mesh=mesh, in_specs=(row, row, row, *specs), out_specs=row, check_vma=False)(
        tokens, experts, weights, gate, up, down
    )


def capacity(n_tokens: int, cfg: ModelConfig) -> int:
    """Assignments each expert takes: capacity_factor times an even share, at least 1."""
    return max(1, math.ceil(n_tokens * cfg.experts_per_token / cfg.n_experts * cfg.capacity_factor))


def capacity_dispatch(tokens, experts, weights, kernels, cfg: ModelConfig):
    """tokens [n, d], experts/weights [n, k] -> ([n, d], kept [n, k]) with one-hot dispatch and
    combine tensors [n, experts, capacity]. First choices claim slots before second choices, and
    earlier tokens before later ones; an assignment past its expert's capacity is dropped."""
    n, k = experts.shape
    c = capacity(n, cfg)
    onehot = jax.nn.one_hot(experts, cfg.n_experts, dtype=jnp.int32)  # [n, k, e]
    by_choice = onehot.transpose(1, 0, 2).reshape(k * n, cfg.n_experts)
    slot = ((jnp.cumsum(by_choice, axis=0) - 1) * by_choice).sum(-1).reshape(k, n).T  # [n, k]
    kept = slot < c
    place = (onehot * kept[..., None]).astype(tokens.dtype)[..., None] * jax.nn.one_hot(slot, c, dtype=tokens.dtype)[
        :, :, None, :
    ]  # [n, k, e, c]
    dispatch, combine = place.sum(1), jnp.einsum("nkec,nk->nec", place, weights)
    gate, up, down = kernels
    xe = jnp.einsum("nec,nd->ecd", dispatch, tokens)
    h = _activation(cfg)(batched_project(xe, gate)) * batched_project(xe, up)
    return jnp.einsum("nec,ecd->nd", combine, batched_project(h, down)), kept


def router_stats(logits, probs, experts, kept, valid) -> RouterStats:
    """RouterStats over the tokens where valid [n] is 1."""
    count = jnp.maximum(valid.sum(), 1.0)
    onehot = jax.nn.one_hot(experts, logits.shape[-1], dtype=jnp.float32)  # [n, k, e]
    load = jnp.einsum("nke,n->e", onehot, valid) / count
    dropped = jnp.zeros((), jnp.float32)
    if kept is not None:
        dropped = jnp.einsum("nk,n->", 1.0 - kept.astype(jnp.float32), valid) / (count * experts.shape[1])
    z = (jax.nn.logsumexp(logits, axis=-1) ** 2 * valid).sum() / count
    return RouterStats(load, (probs * valid[:, None]).sum(0) / count, z, dropped)
