"""Causal self-attention: flax's MultiHeadAttention with RoPE, segment ids and a per-row KV cache.

The parent owns the projections (`query`, `key`, `value`, `out`), the q/k norm slots and the cache
variables (`cached_key`, `cached_value`). `__call__` is ours: RoPE must go between the key
projection and the cache write, where the parent has no hook, and the parent's decode mode takes
exactly one token per call with one cache index for the whole batch.

Four modes, chosen by the caller:
  train    full sequences, no cache.
  prefill  full (right-padded) prompts; their keys and values are written to cache rows [0, length).
  chunk    one chunk of (right-padded) prompts at the same positions in every row (chunked prefill):
           written to the cache at those positions, each query attending the cache up to itself.
  decode   one token per row, written at that row's own position.
The attention itself is `lm.kernels.attention`, which picks the kernel.
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ModelConfig
from lm.kernels import attention
from sharding.rules import axes, logical_constraint

Mode = Literal["train", "prefill", "chunk", "decode"]


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies, float32 [head_dim // 2], computed as transformers computes them
    (modeling_rope_utils: default, linear, llama3 and yarn)."""
    dim = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2).astype(np.float32) / dim))
    factor = cfg.rope_scaling
    if cfg.rope_type == "yarn":
        return _yarn_frequencies(cfg, inv_freq)
    if cfg.rope_type != "llama3":
        return (inv_freq / factor).astype(np.float32)
    # Llama 3.1: long wavelengths are divided by factor, short ones kept, the band between blended.
    low, high, old_len = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_frequencies(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    """YaRN (Peng et al. 2023): dimensions that turn more than beta_fast times over the original
    context keep their frequency, those that turn fewer than beta_slow times are divided by factor,
    and a linear ramp blends the dimensions between."""
    dim, base, old_len = cfg.dim_per_head, cfg.rope_theta, cfg.rope_original_max_len

    def dimension(rotations):  # the dimension that turns `rotations` times over the original context
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(cfg.rope_beta_fast), dimension(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency (extrapolated), 0: divided by factor (interpolated)
    return (inv_freq / cfg.rope_scaling * (1 - keep) + inv_freq * keep).astype(np.float32)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale for a context stretched by `factor` (1 where nothing is stretched)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN multiplies cos and sin by (so the attention logits by its square); 1 otherwise."""
    if cfg.rope_type != "yarn":
        return 1.0
    return yarn_mscale(cfg.rope_scaling) if cfg.rope_attention_factor is None else cfg.rope_attention_factor


def rope(x: jax.Array, positions: jax.Array, inv_freq, factor: float = 1.0) -> jax.Array:
    """Rotary embedding, 'rotate half' layout (as in Llama and Hugging Face).

    x: [batch, length, heads, head_dim], positions: [batch, length], inv_freq: [head_dim // 2].
    factor: multiplies cos and sin (YaRN's attention factor; see rope_attention_factor).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [batch, length, half]
    sin, cos = jnp.sin(angles)[:, :, None, None, :], jnp.cos(angles)[:, :, None, None, :]
    if factor != 1.0:
        sin, cos = sin * factor, cos * factor
    # The halves as an axis of their own ([..., 2, half]), not split and concatenated along head_dim:
    # the same numbers, and a backward pass with fewer copies.
    halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    x1, x2 = halves[..., :1, :], halves[..., 1:, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-2).reshape(x.shape).astype(x.dtype)


def per_token(layer: nnx.Module, x: jax.Array, n_in: int = 1) -> jax.Array:
    """Apply a projection to x [batch, length, ...] with batch and length merged into one token
    axis, so that the weight gradient contracts over a single axis (compilers then need no
    transposed copy of the output gradient). n_in: how many trailing axes of x the layer contracts."""
    lead = x.shape[: x.ndim - n_in]
    y = layer(x.reshape(-1, *x.shape[x.ndim - n_in :]))
    return y.reshape(*lead, *y.shape[1:])


def kernel_init(cfg: ModelConfig, residual: bool = False):
    # GPT-2 scaling: projections that write into the residual stream start smaller with depth.
    std = cfg.init_std / (2 * cfg.n_layers) ** 0.5 if residual else cfg.init_std
    return nnx.initializers.normal(std)


class Attention(nnx.MultiHeadAttention):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hd, dtype, param_dtype = cfg.dim_per_head, cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
        super().__init__(
            num_heads=cfg.n_heads,
            num_kv_heads=cfg.n_kv_heads,
            in_features=cfg.d_model,
            qkv_features=cfg.n_heads * hd,
            out_features=cfg.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init(cfg),
            out_kernel_init=kernel_init(cfg, residual=True),
            use_bias=cfg.qkv_bias or cfg.attn_out_bias,
            decode=False,
            deterministic=True,
            keep_rngs=False,
            rngs=rngs,
            kernel_metadata=axes("embed", "heads", "head_dim"),
            bias_metadata=axes("heads", "head_dim"),
            out_kernel_metadata=axes("heads", "head_dim", "embed"),
            out_bias_metadata=axes("embed"),
        )
        # GQA: k/v get their own axis name, so kv heads can stay whole when the tensor axis exceeds them.
        for proj in (self.key, self.value):
            proj.kernel.set_metadata(out_sharding=("embed", "kv_heads", "head_dim"))
            if proj.bias is not None:
                proj.bias.set_metadata(out_sharding=("kv_heads", "head_dim"))
        # The parent's one bias flag covers q/k/v and out: Qwen2 biases only q/k/v, GPT-2 all four.
        for proj, biased in ((self.query, cfg.qkv_bias), (self.key, cfg.qkv_bias), (self.value, cfg.qkv_bias),
                             (self.out, cfg.attn_out_bias)):  # fmt: skip
            if not biased:
                proj.bias = nnx.data(None)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's queries and keys (the parent's are LayerNorms)
            self.normalize_qk = True
            norm = dict(epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                        scale_metadata=axes("head_dim"))  # fmt: skip
            self.query_ln, self.key_ln = nnx.RMSNorm(hd, **norm), nnx.RMSNorm(hd, **norm)
        self.cfg = cfg

    def init_cache(self, input_shape, dtype=jnp.float32, *, layers: int | None = None):
        """Zeroed cache [batch, kv_heads, max_length, head_dim] for input_shape (batch, max_length, ...),
        with a leading [layers] axis for a stacked module. Heads-major: the decode kernel reads it in place."""
        batch, max_length = input_shape[:2]
        shape = (batch, self.num_kv_heads, max_length, self.head_dim)
        names = ("batch", "kv_heads", "cache_length", "head_dim")
        if layers is not None:
            shape, names = (layers, *shape), ("layers", *names)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype), **axes(*names))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype), **axes(*names))

    def __call__(self, x, positions, segment_ids=None, *, mode: Mode = "train", sliding_window=None):
        """x: [batch, length, d_model]; positions, segment_ids: [batch, length] (segment 0 = padding).
        sliding_window: None, or this layer's window (an int, or a traced int inside the layer scan)."""
        cfg = self.cfg
        q, k, v = (per_token(proj, x) for proj in (self.query, self.key, self.value))
        if self.normalize_qk:
            q, k = self.query_ln(q), self.key_ln(k)
        if cfg.positions == "rope":
            inv_freq, factor = rope_frequencies(cfg), rope_attention_factor(cfg)
            q, k = rope(q, positions, inv_freq, factor), rope(k, positions, inv_freq, factor)
        q = logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        options = dict(sliding_window=sliding_window, softcap=cfg.attn_softcap, scale=scale)

        if mode == "decode":
            if x.shape[1] != 1:
                raise ValueError(f"decode mode takes one token per row, got length {x.shape[1]}")
            rows, at = jnp.arange(x.shape[0]), positions[:, 0]
            cached_k, cached_v = self.cached_key[...], self.cached_value[...]
            new_k, new_v = k[:, 0].astype(cached_k.dtype), v[:, 0].astype(cached_v.dtype)
            # The cache is read before this token's slot is written (the token comes as `own`), so
            # the write can happen in place. A position past the cache would be dropped silently;
            # the decode loop checks lengths first.
            out = attention(q, cached_k, cached_v, decode_positions=at, own=(new_k, new_v), **options)
            self.cached_key[...] = cached_k.at[rows, :, at].set(new_k)
            self.cached_value[...] = cached_v.at[rows, :, at].set(new_v)
        elif mode == "chunk":
            # Slots past a row's prompt hold padding that no prompt query reaches (each sees only the
            # slots up to its own position) and that decoding overwrites before it reads them.
            for cache, new in ((self.cached_key, k), (self.cached_value, v)):
                new = new.transpose(0, 2, 1, 3).astype(cache.dtype)
                cache[...] = jax.lax.dynamic_update_slice_in_dim(cache[...], new, positions[0, 0], axis=2)
            out = attention(q, self.cached_key[...], self.cached_value[...], chunk_positions=positions, **options)
        else:
            if mode == "prefill":
                length = x.shape[1]
                for cache, new in ((self.cached_key, k), (self.cached_value, v)):
                    cache[...] = cache[...].at[:, :, :length].set(new.transpose(0, 2, 1, 3).astype(cache.dtype))
            out = attention(q, k, v, segment_ids, impl=cfg.attention_impl, packed=mode == "train",
                            max_segments=cfg.max_segments, positions=positions,
                            context_parallel=cfg.context_parallel, **options)  # fmt: skip
        out = logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return per_token(self.out, out, n_in=2)
