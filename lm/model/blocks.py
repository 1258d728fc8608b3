"""The pieces of a block besides attention: norms, the MLP, and the pre-norm residual Block."""

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig
from lm.model import moe
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

    def __init__(self, cfg: ModelConfig, *, d_ff: int | None = None, rngs: nnx.Rngs):
        d_ff = d_ff or cfg.d_ff

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
        self.gate = linear(cfg.d_model, d_ff, ("embed", "mlp")) if self.gated else nnx.data(None)
        self.up = linear(cfg.d_model, d_ff, ("embed", "mlp"))
        self.down = linear(d_ff, cfg.d_model, ("mlp", "embed"), residual=True)

    def __call__(self, x):
        if self.activation == "swiglu":
            h = jax.nn.silu(per_token(self.gate, x)) * per_token(self.up, x)
        elif self.activation == "geglu":
            h = jax.nn.gelu(per_token(self.gate, x), approximate=True) * per_token(self.up, x)
        else:
            h = jax.nn.gelu(per_token(self.up, x), approximate=True)  # GPT-2's tanh approximation
        h = logical_constraint(h, ("batch", "length", "mlp"))
        return per_token(self.down, h)


class ExpertLinear(nnx.Module):
    """n_experts projections in one kernel [experts, in, out]."""

    def __init__(self, cfg: ModelConfig, d_in: int, d_out: int, names, *, residual=False, rngs: nnx.Rngs):
        init = kernel_init(cfg, residual)
        shape = (cfg.n_experts, d_in, d_out)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), **axes("expert", *names))

    def weights(self, dtype) -> moe.ExpertWeights:
        """What the dispatch multiplies by (lm.lora's adapter on the experts adds its factors)."""
        return moe.ExpertWeights(self.kernel[...].astype(dtype))


class MoE(nnx.Module):
    """The mixture-of-experts MLP: routed experts (kernels [experts, ...]) plus, for Qwen2-MoE, shared
    experts (a dense MLP of width shared_d_ff) scaled by a sigmoid gate. Routing and dispatch: lm.model.moe."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.expert_d_ff
        dtypes = dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.router = nnx.Linear(d, cfg.n_experts, use_bias=False, kernel_init=kernel_init(cfg),
                                 kernel_metadata=axes("embed", None), **dtypes)  # fmt: skip
        self.gate = ExpertLinear(cfg, d, f, ("embed", "expert_mlp"), rngs=rngs)
        self.up = ExpertLinear(cfg, d, f, ("embed", "expert_mlp"), rngs=rngs)
        self.down = ExpertLinear(cfg, f, d, ("expert_mlp", "embed"), residual=True, rngs=rngs)
        self.shared = MLP(cfg, d_ff=cfg.shared_d_ff, rngs=rngs) if cfg.shared_d_ff else nnx.data(None)
        self.shared_gate = nnx.data(None)
        if cfg.shared_d_ff:
            self.shared_gate = nnx.Linear(d, 1, use_bias=False, kernel_init=kernel_init(cfg),
                                          kernel_metadata=axes("embed", None), **dtypes)  # fmt: skip

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, moe.RouterStats]:
        """x [batch, length, d_model]; valid [batch, length] (real tokens, for the statistics only).
        Returns the layer's output [batch, length, d_model] and its RouterStats."""
        cfg = self.cfg
        lead, d = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, d)
        logits = jnp.dot(tokens, self.router.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32)
        probs, weights, experts = moe.route(logits, cfg)
        kernels = tuple(p.weights(x.dtype) for p in (self.gate, self.up, self.down))
        if cfg.capacity_factor is None and moe.expert_devices() > 1:
            y, kept = moe.expert_parallel(tokens, experts, weights.astype(x.dtype), kernels, cfg), None
        elif cfg.capacity_factor is None:
            y, kept = moe.dropless(tokens, experts, weights.astype(x.dtype), kernels, cfg), None
        else:
            y, kept = moe.capacity_dispatch(tokens, experts, weights.astype(x.dtype), kernels, cfg)
        if self.shared is not None:
            gate = jax.nn.sigmoid(self.shared_gate(tokens))
            y = y + gate * self.shared(tokens[None])[0]
        valid = jnp.ones(lead, jnp.float32) if valid is None else valid.astype(jnp.float32)
        stats = moe.router_stats(logits, probs, experts, kept, valid.reshape(-1))
        return logical_constraint(y.reshape(x.shape), ("batch", "length", "embed")), stats


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).
    With post_norms (Gemma 2) each branch's output is normalised again before the add.
    experts: the MLP is a mixture of experts (MoE); the block then also returns its RouterStats."""

    def __init__(self, cfg: ModelConfig, *, experts: bool = False, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = MoE(cfg, rngs=rngs) if experts else MLP(cfg, rngs=rngs)
        self.attn_post_norm = make_norm(cfg, rngs) if cfg.post_norms else nnx.data(None)
        self.mlp_post_norm = make_norm(cfg, rngs) if cfg.post_norms else nnx.data(None)

    def __call__(self, x, positions, segment_ids=None, *, mode: Mode = "train", sliding_window=None):
        """-> (x, RouterStats or None for a dense MLP)."""
        h = self.attn(self.attn_norm(x), positions, segment_ids, mode=mode, sliding_window=sliding_window)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        stats = None
        if isinstance(self.mlp, MoE):
            h, stats = self.mlp(self.mlp_norm(x), None if segment_ids is None else segment_ids > 0)
        else:
            h = self.mlp(self.mlp_norm(x))
        x = x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h))
        return logical_constraint(x, ("batch", "length", "embed")), stats
