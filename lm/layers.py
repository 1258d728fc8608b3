"""The pieces of a block besides attention: norms, the MLP, and the pre-norm residual Block."""

import jax
import jax.numpy as jnp
from flax import nnx

from lm.attention import Attention, Mode, kernel_init, per_token
from lm.config import ModelConfig
from sharding.rules import logical_constraint


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    common = dict(
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
        scale_metadata={"out_sharding": ("norm",)},
    )
    if cfg.norm == "layer":
        return nnx.LayerNorm(cfg.d_model, bias_metadata={"out_sharding": ("norm",)}, **common)
    return nnx.RMSNorm(cfg.d_model, **common)


class MLP(nnx.Module):
    """SwiGLU (Llama: down(silu(gate(x)) * up(x))) or GELU (GPT-2: down(gelu(up(x))))."""

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
                kernel_metadata={"out_sharding": names},
                bias_metadata={"out_sharding": names[1:]},
            )

        self.gated = cfg.mlp == "swiglu"
        self.gate = linear(cfg.d_model, cfg.d_ff, ("embed", "mlp")) if self.gated else nnx.data(None)
        self.up = linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
        self.down = linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), residual=True)

    def __call__(self, x):
        if self.gated:
            h = jax.nn.silu(per_token(self.gate, x)) * per_token(self.up, x)
        else:
            h = jax.nn.gelu(per_token(self.up, x), approximate=True)  # GPT-2's tanh approximation
        h = logical_constraint(h, ("batch", "length", "mlp"))
        return per_token(self.down, h)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids=None, *, mode: Mode = "train"):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, mode=mode)
        x = x + self.mlp(self.mlp_norm(x))
        return logical_constraint(x, ("batch", "length", "embed"))
