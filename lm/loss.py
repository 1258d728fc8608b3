"""Token-level cross-entropy in float32, whole or chunked along the sequence."""

import jax
import jax.numpy as jnp

from lm.model import unembed
from sharding.rules import logical_constraint


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of weighted negative log-likelihoods and the sum of weights.

    Returning sums (not a mean) lets the train step divide every microbatch by the whole batch's
    weight, so k microbatches give exactly the gradient of one big batch.
    logits: [batch, length, vocab] float32; targets: int [batch, length]; weights: [batch, length].
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return ((log_z - target_logit) * weights).sum(), weights.sum()


def _chunked(hidden: jax.Array, chunk: int, *per_position: jax.Array) -> tuple[int, list[jax.Array]]:
    """(n, [hidden, *per_position] as [n, batch, chunk, ...]): the length padded to n * chunk (zeros:
    padded positions carry zero targets and weights) and cut into chunks along the sequence, every
    chunk keeping all batch rows so the batch stays split over the data-parallel devices."""
    batch, length = hidden.shape[:2]
    n = -(-length // chunk)
    pad = n * chunk - length

    def chunks(x):  # [batch, length, ...] -> [n, batch, chunk, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x
        x = x.reshape(batch, n, chunk, *x.shape[2:]).swapaxes(0, 1)
        return logical_constraint(x, (None, "batch", "length", "embed")[: x.ndim])

    return n, [chunks(x) for x in (hidden, *per_position)]


def chunked_cross_entropy_sum(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    chunk: int,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cross_entropy_sum(unembed(hidden, head, softcap), targets, weights), `chunk` positions at a time.

    Only one chunk's float32 logits [batch, chunk, vocab] exist at once, in the forward pass and in
    the backward pass (which recomputes each chunk's logits from its hidden states instead of
    keeping them). Chunks run along the sequence, so every chunk keeps all batch rows and the batch
    stays split over the data-parallel devices. The length is padded to a multiple of `chunk` with
    zero-weight positions.
    hidden: [batch, length, d_model] final-normed; head: [d_model, vocab].
    """

    @jax.checkpoint
    def body(sums, xs):
        h, t, w = xs
        loss, weight = cross_entropy_sum(unembed(h, head, softcap), t, w)
        return (sums[0] + loss, sums[1] + weight), None

    zero = jnp.zeros((), jnp.float32)
    (loss, weight), _ = jax.lax.scan(body, (zero, zero), _chunked(hidden, chunk, targets, weights)[1])
    return loss, weight


def chunked_token_logps(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    chunk: int,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    """log softmax(unembed(hidden, head, softcap) / temperature) at the targets, float32 [batch, length],
    `chunk` positions at a time: per-token log-probs (DPO, GRPO) without [batch, length, vocab] logits,
    chunked and recomputed in the backward pass as chunked_cross_entropy_sum is."""
    batch, length = targets.shape

    @jax.checkpoint
    def body(_, xs):
        h, t = xs
        logits = unembed(h, head, softcap).astype(jnp.float32) / temperature
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return None, target_logit - jax.nn.logsumexp(logits, axis=-1)

    n, xs = _chunked(hidden, chunk, targets)
    _, out = jax.lax.scan(body, None, xs)
    return out.swapaxes(0, 1).reshape(batch, n * chunk)[:, :length]
