"""Token-level cross-entropy in float32."""

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of weighted negative log-likelihoods and the sum of weights.

    Returning sums (not a mean) lets gradient accumulation divide once by the whole batch's weight,
    so k microbatches give exactly the gradient of one big batch.
    logits: [batch, length, vocab] float32; targets: int [batch, length]; weights: [batch, length].
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return ((log_z - target_logit) * weights).sum(), weights.sum()
