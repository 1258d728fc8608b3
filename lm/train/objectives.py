"""Preference and RL objectives: DPO and GRPO losses as TRL 1.16 defines them.

DPO (TRL's `DPOTrainer._compute_loss`, f-divergence reverse KL): with per-sequence sums of completion
log-probs, `delta = (chosen - ref_chosen) - (rejected - ref_rejected)`;
  sigmoid: `-log sigmoid(beta * delta)`
  ipo:     `(delta_per_token - 1 / (2 beta))^2`, each log-ratio divided by its completion's length
averaged over pairs. The implicit rewards are `beta * (logp - ref_logp)`.

GRPO (TRL's `GRPOTrainer._compute_loss`, token-level importance sampling): per completion token,
`ratio = exp(logp - old_logp)`, `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`, plus
`beta * ratio * k3` with `k3 = exp(ref - logp) - (ref - logp) - 1` (TRL 1.16 multiplies by the
ratio by default, `use_bias_correction_kl`). TRL 1.16's default `loss_type` is
`dapo`: the masked sum over the batch divided by its number of completion tokens; `grpo` divides
each completion by its own length and then averages the completions. Log-probs are taken from
logits divided by the sampling temperature, as TRL does. Advantages are group-normalised rewards:
`(r - mean_group) / (std_group + 1e-4)`, the standard deviation with Bessel's correction.

The reference of a LoRA run is the same model with its adapters switched off (`lm.lora.adapters_off`):
no second copy of the weights. A full fine-tune's reference, or a folder's, is a frozen model of its own.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import lora
from lm.data.preference import Prompt, Rewards, completion_batch
from lm.errors import UserError
from lm.infer.decode import generate
from lm.infer.sampling import Sampling
from lm.loss import chunked_token_logps


def token_logps(model: nnx.Module, batch: dict, temperature: float = 1.0) -> jax.Array:
    """log p(target) of every position, float32 [batch, length]; zero where the weight is zero.

    Large vocabularies go chunk by chunk along the sequence (model.loss_chunk, as the SFT loss does)."""
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    chunk = model.cfg.loss_chunk_for(tokens.shape[1])
    if chunk:
        hidden = model(tokens, positions, segments, return_hidden=True)
        logp = chunked_token_logps(hidden, model.head(), batch["targets"], chunk, model.cfg.final_softcap, temperature)
    else:
        logits = model(tokens, positions, segments).astype(jnp.float32) / temperature
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.where(batch["weights"] > 0, logp, 0.0)


def sequence_logps(model: nnx.Module, batch: dict) -> jax.Array:
    """Summed log-probs of each row's weighted (completion) tokens [batch]."""
    return (token_logps(model, batch) * batch["weights"]).sum(axis=-1)


def reference_token_logps(
    model: nnx.Module, batch: dict, temperature: float = 1.0, reference: nnx.Module | None = None
) -> jax.Array:
    """token_logps under the reference, no gradient: `reference`, a frozen model of its own (a full
    fine-tune's initial weights, or objective.reference's folder), or where that is None the LoRA
    model's own frozen base (adapters off)."""
    if reference is not None:
        return jax.lax.stop_gradient(token_logps(reference, batch, temperature))
    if not lora.adapters(model):
        raise UserError(
            "objective.reference=base needs LoRA adapters (lora.rank > 0) to switch off; a full fine-tune "
            "needs a frozen reference copy"
        )
    with lora.adapters_off(model):
        return jax.lax.stop_gradient(token_logps(model, batch, temperature))


def dpo_loss(
    logps: jax.Array, ref_logps: jax.Array, tokens: jax.Array, *, beta: float, loss_type: str = "sigmoid"
) -> tuple[jax.Array, dict]:
    """The DPO loss and its metrics for [2 * pairs] sequences, chosen rows first, then rejected.

    logps, ref_logps: summed completion log-probs [2P]; tokens: completion tokens per row [2P]."""
    chosen, rejected = jnp.split(logps - ref_logps, 2)
    if loss_type == "sigmoid":
        per_pair = -jax.nn.log_sigmoid(beta * (chosen - rejected))
    elif loss_type == "ipo":
        n_chosen, n_rejected = jnp.split(jnp.maximum(tokens.astype(jnp.float32), 1.0), 2)
        per_pair = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    reward_chosen = beta * jax.lax.stop_gradient(chosen)
    reward_rejected = beta * jax.lax.stop_gradient(rejected)
    metrics = {
        "rewards_chosen": reward_chosen.mean(),
        "rewards_rejected": reward_rejected.mean(),
        "reward_margin": (reward_chosen - reward_rejected).mean(),
        "reward_accuracy": (reward_chosen > reward_rejected).astype(jnp.float32).mean(),
    }
    return per_pair.mean(), metrics


def dpo_objective(model: nnx.Module, batch: dict, ref_logps: jax.Array, *, beta: float, loss_type: str):
    """dpo_loss of the model on a pair batch (lm.data.preference.pair_batch), against given reference sums."""
    return dpo_loss(sequence_logps(model, batch), ref_logps, batch["weights"].sum(-1), beta=beta, loss_type=loss_type)


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Group-normalised advantages of [prompts * group_size] rewards, groups contiguous (TRL's
    scale_rewards='group'). NaN rewards (unscorable) are left out of their group's statistics and get
    advantage 0."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    with warnings.catch_warnings():  # all-NaN groups warn; they end as advantage 0
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(r, axis=1, keepdims=True)
        std = np.nanstd(r, axis=1, keepdims=True, ddof=1) if group_size > 1 else np.zeros_like(mean)
    advantages = (r - mean) / (std + 1e-4)
    return np.nan_to_num(advantages, nan=0.0).reshape(-1).astype(np.float32)


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    beta: float,
    epsilon: float,
    loss_type: str = "dapo",
    total_tokens: jax.Array | None = None,
    unbiased_kl: bool = True,
) -> tuple[jax.Array, dict]:
    """The clipped surrogate with the k3 KL penalty, over completion tokens.

    logps, old_logps, ref_logps, mask: [completions, length]; advantages: [completions].
    total_tokens: dapo's divisor (the completion tokens of the whole generation batch, so that
    microbatches add up to the batch's loss); default: this batch's.
    unbiased_kl: multiply k3 by the (differentiable) ratio, so its gradient is the reverse KL's on
    samples of the old policy (DeepSeek-V3.2; TRL 1.16's default `use_bias_correction_kl=True`)."""
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logps - old_logps)
    a = advantages[:, None]
    per_token = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * a)
    metrics = {}
    if beta != 0.0:
        delta = ref_logps - logps
        kl = jnp.exp(delta) - delta - 1
        if unbiased_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = (kl * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if loss_type == "dapo":
        denominator = mask.sum() if total_tokens is None else total_tokens
        loss = (per_token * mask).sum() / jnp.maximum(denominator, 1.0)
    elif loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).mean()
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}")
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
    metrics["clip_fraction"] = (clipped * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return loss, metrics


@dataclasses.dataclass
class Rollout:
    """One GRPO generation batch: group_size sampled completions per prompt, scored, with everything
    the optimisation passes over it need (TRL's `_generate_and_score_completions`)."""

    prompts: list[Prompt]  # one per completion (each prompt repeated over its group)
    completion_ids: list[list[int]]  # through the EOS when one was sampled
    completions: list[str]
    rewards: np.ndarray  # [completions] weighted sum (NaN: unscorable)
    per_reward: np.ndarray  # [completions, reward functions]
    advantages: np.ndarray  # [completions]
    batch: dict  # lm.data.preference.completion_batch, completion tokens weighted
    old_logps: jax.Array  # [completions, length] the sampling policy's, at the temperature
    ref_logps: jax.Array | None  # the reference's (None when beta = 0)

    def metrics(self) -> dict[str, float]:
        """TRL's reward, reward_std (over the whole batch, Bessel-corrected) and mean completion length."""
        scored = self.rewards[np.isfinite(self.rewards)].astype(np.float64)
        return {
            "reward_mean": float(scored.mean()) if scored.size else float("nan"),
            "reward_std": float(scored.std(ddof=1)) if scored.size > 1 else float("nan"),
            "completion_length": float(np.mean([len(c) for c in self.completion_ids])),
        }


@nnx.jit(static_argnames=("temperature", "with_reference"))
def _rollout_logps(model, reference, batch, temperature: float, with_reference: bool):
    policy = token_logps(model, batch, temperature)
    return policy, reference_token_logps(model, batch, temperature, reference) if with_reference else None


def rollout(
    model: nnx.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    rewards: Rewards,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    seq_len: int,
    beta: float,
    reference: nnx.Module | None = None,
) -> Rollout:
    """Sample group_size completions per prompt with the decode loop on the policy as it is (LoRA
    adapters in place, no export), score them with the reward functions and normalise per group.

    seed drives the sampling (a resumed run passes the same seed for the same step). reference: as
    reference_token_logps takes it (None: the LoRA base, adapters off)."""
    repeated = [p for p in prompts for _ in range(group_size)]
    stop_ids = tuple(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))  # as lm.infer.decode.complete
    generation = generate(
        model,
        [p.ids for p in repeated],
        max_new_tokens=max_new_tokens,
        sampling=Sampling(temperature=temperature),
        seed=seed,
        eos_id=stop_ids,
    )
    completion_ids = [list(t) for t in generation.tokens]
    texts = [tokenizer.decode(t) for t in completion_ids]
    total, per = rewards.score(repeated, texts, completion_ids)
    batch = {
        k: jnp.asarray(v)
        for k, v in completion_batch([p.ids for p in repeated], completion_ids, seq_len, pad_id=0).items()
    }
    old, ref = _rollout_logps(model, reference, batch, temperature, beta != 0.0)
    return Rollout(repeated, completion_ids, texts, total, per, group_advantages(total, group_size), batch, old, ref)
