"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import optax
from flax import nnx

from lm.config import OptimizerConfig


def learning_rate(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _decay_mask(params):
    # Weight decay on weight matrices and embeddings only; norm scales and biases are left alone
    # (as in GPT-2 and Llama). Decided by name because stacked layers make ndim misleading.
    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return any(n in ("kernel", "embedding", "lora_a", "lora_b") for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_tx(cfg: OptimizerConfig, total_steps: int, max_bad_steps: int = 0) -> optax.GradientTransformation:
    """Clip, then AdamW; an update with non-finite gradients is dropped, up to max_bad_steps in a row."""
    adamw = optax.adamw(
        learning_rate(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=_decay_mask,
    )
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip is not None else optax.identity()
    return optax.apply_if_finite(optax.chain(clip, adamw), max_bad_steps)


def make_optimizer(
    model: nnx.Module, cfg: OptimizerConfig, total_steps: int, max_bad_steps: int = 0, wrt=nnx.Param
) -> nnx.Optimizer:
    """`wrt` selects what is trained: every Param, or only nnx.LoRAParam for a LoRA run (the frozen
    base then has no Adam state at all)."""
    return nnx.Optimizer(model, make_tx(cfg, total_steps, max_bad_steps), wrt=wrt)
