"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus) and min-p, seeded."""

import dataclasses

import jax
import jax.numpy as jnp

from lm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the row (CTRL, Keskar 2019)

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"--temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k={self.top_k} must be >= 0 (0 means off)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p={self.top_p} must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise UserError(f"--min-p={self.min_p} must be in [0, 1)")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty={self.repetition_penalty} must be > 0")


def apply_repetition_penalty(logits, seen, penalty: float):
    """seen: bool [batch, vocab]. Positive logits are divided by the penalty, negative multiplied."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """logits: float32 [batch, vocab] -> token ids int32 [batch]."""
    if s.temperature == 0.0 or s.top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    neg = jnp.finfo(logits.dtype).min
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.min_p > 0:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < s.min_p * probs.max(axis=-1, keepdims=True), neg, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < s.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
