"""The pieces of a block besides attention: norms, the MLP, and the pre-norm residual Block."""

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig
from lm.model.attention import Attention, Mode, kernel_init, per_token
from sharding.rules import axes, logical_constraint


class RMSNormPlusOne(nnx.RMSNorm):
    """Gemma's RMSNorm: the stored scale w starts at 0 and multiplies as (1 + w), in float32."""

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype or x.dtype)


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    common = dict(
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
        scale_metadata=axes("norm"),
    )
    if cfg.norm == "layer":
        return nnx.LayerNorm(cfg.d_model, bias_metadata=axes("norm"), **common)
    if cfg.norm == "rms_plus_one":
        return RMSNormPlusOne(cfg.d_model, scale_init=nnx.initializers.zeros, **common)
    return nnx.RMSNorm(cfg.d_model, **common)


class MLP(nnx.Module):
    """SwiGLU (Llama: down(silu(gate(x)) * up(x))), GeGLU (Gemma: the same with tanh-GELU) or
    GELU (GPT-2: down(gelu(up(x))))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        def linear(d_in, d_out, names, residual=False):
            return nnx.Linear(
                d_in,
                d_out,
                use_bias=cfg.mlp_bias,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.dtype(cfg.param_dtype),
                kernel_init=kernel_init(cfg, residual),
                rngs=rngs,
                kernel_metadata=axes(*names),
                bias_metadata=axes(*names[1:]),
            )

        self.gated, self.activation = cfg.gated_mlp, cfg.mlp
        self.gate = linear(cfg.d_model, cfg.d_ff, ("embed", "mlp")) if self.gated else nnx.data(None)
        self.up = linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
        self.down = linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), residual=True)

    def __call__(self, x):
        if self.activation == "swiglu":
            h = jax.nn.silu(per_token(self.gate, x)) * per_token(self.up, x)
        elif self.activation == "geglu":
            h = jax.nn.gelu(per_token(self.gate, x), approximate=True) * per_token(self.up, x)
        else:
            h = jax.nn.gelu(per_token(self.up, x), approximate=True)  # GPT-2's tanh approximation
        h = logical_constraint(h, ("batch", "length", "mlp"))
        return per_token(self.down, h)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).
    With post_norms (Gemma 2) each branch's output is normalised again before the add."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.attn_post_norm = make_norm(cfg, rngs) if cfg.post_norms else nnx.data(None)
        self.mlp_post_norm = make_norm(cfg, rngs) if cfg.post_norms else nnx.data(None)

    def __call__(self, x, positions, segment_ids=None, *, mode: Mode = "train", sliding_window=None):
        h = self.attn(self.attn_norm(x), positions, segment_ids, mode=mode, sliding_window=sliding_window)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        h = self.mlp(self.mlp_norm(x))
        x = x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h))
        return logical_constraint(x, ("batch", "length", "embed"))
