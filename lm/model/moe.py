"""Routing and dispatch of the mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE; the module is
`lm.model.blocks.MoE`): a router picks experts_per_token of n_experts gated MLPs per token.

Routing, as transformers does it for all three: softmax over all experts in float32, the top k,
renormalised to sum to 1 when router_norm_topk (Mixtral's softmax over the top-k logits is the same
numbers). Two dispatches compute the same layer:
  dropless (capacity_factor None)  assignments sorted by expert, grouped matmuls
                                   (`lm.kernels.grouped_matmul`); no [tokens, experts, ...] tensor.
  capacity (capacity_factor set)   one-hot [tokens, experts, capacity] dispatch and combine einsums;
                                   assignments past an expert's capacity are dropped (GShard).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.kernels import grouped_matmul


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


def _activation(cfg: ModelConfig):
    return jax.nn.silu if cfg.mlp == "swiglu" else lambda h: jax.nn.gelu(h, approximate=True)


def dropless(tokens, experts, weights, kernels, cfg: ModelConfig):
    """tokens [n, d], experts/weights [n, k] -> [n, d]: every assignment computed, by grouped matmuls
    over the assignments sorted by expert."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignment slots grouped by expert
    rows = tokens[order // k]  # [n * k, d]
    sizes = jnp.bincount(flat, length=cfg.n_experts).astype(jnp.int32)
    gate, up, down = kernels
    act = _activation(cfg)
    h = act(grouped_matmul(rows, gate, sizes, impl=cfg.moe_impl)) * grouped_matmul(rows, up, sizes, impl=cfg.moe_impl)
    out = grouped_matmul(h, down, sizes, impl=cfg.moe_impl)  # [n * k, d], in sorted order
    out = out[jnp.argsort(order)].reshape(n, k, -1)  # back to [token, slot]
    return jnp.einsum("nkd,nk->nd", out, weights)


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
    h = _activation(cfg)(jnp.einsum("ecd,edf->ecf", xe, gate)) * jnp.einsum("ecd,edf->ecf", xe, up)
    return jnp.einsum("nec,ecd->nd", combine, jnp.einsum("ecf,efd->ecd", h, down)), kept


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
