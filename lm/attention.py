"""Causal self-attention: flax's MultiHeadAttention plus RoPE, segment ids and a per-row KV cache.

The parent owns the projections (`query`, `key`, `value`, `out`), the optional q/k norms and the
cache variables (`cached_key`, `cached_value`). We override `__call__` because the parent has no
hook between the key projection and the cache write (RoPE must go there) and its decode mode takes
exactly one token per call with one cache index for the whole batch.

Three modes, chosen by the caller:
  train    full sequences, no cache.
  prefill  full (right-padded) prompts; their keys and values are written to cache rows [0, length).
  decode   one token per row, written at that row's own position.
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ModelConfig
from sharding.rules import logical_constraint

Mode = Literal["train", "prefill", "decode"]


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies, float32 [head_dim // 2], computed as transformers computes them
    (modeling_rope_utils: default, linear and llama3)."""
    dim = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2).astype(np.float32) / dim))
    factor = cfg.rope_scaling
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


def rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Rotary embedding, 'rotate half' layout (as in Llama and Hugging Face).

    x: [batch, length, heads, head_dim], positions: [batch, length], inv_freq: [head_dim // 2].
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [batch, length, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(segment_ids: jax.Array, sliding_window=None) -> jax.Array:
    """Causal mask that also keeps packed documents apart. segment_ids: [batch, length], 0 = padding.
    With a sliding window (an int, possibly traced), a query sees at most that many keys, itself included.

    Returns bool [batch, 1, length, length] (broadcast over heads).
    """
    length = segment_ids.shape[-1]
    q, kv = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    causal = q >= kv
    if sliding_window is not None:
        causal = causal & (q - kv < sliding_window)
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_doc)[:, None]


def xla_attention(q, k, v, *, mask, scale=None, softcap=None):
    """Reference attention with the options no kernel has: a custom scale and logit soft-capping.

    q: [batch, q_len, heads, head_dim], k/v: [batch, kv_len, kv_heads, head_dim], mask: bool
    [batch, 1, q_len, kv_len]. GQA groups the query heads per kv head instead of repeating K/V.
    Scores and softmax are float32, as in transformers' eager attention.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


def dot_product_attention(
    q, k, v, mask, impl: str, causal: bool, segment_ids=None, *, sliding_window=None, softcap=None, scale=None
):
    """q: [batch, q_len, heads, head_dim], k/v: [batch, kv_len, kv_heads, head_dim] (GQA when fewer).
    The mask already holds the sliding window; it is passed for kernels that can skip those blocks."""
    if sliding_window is not None or softcap is not None or scale is not None:
        return xla_attention(q, k, v, mask=mask, scale=scale, softcap=softcap)
    if impl == "splash" and causal:
        from lm.splash import splash_attention  # imported lazily: only TPU recipes need Pallas

        return splash_attention(q, k, v, segment_ids)
    if impl == "cudnn" and causal:
        # cuDNN skips the masked half itself when told the mask is causal.
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


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
            use_bias=cfg.qkv_bias,
            decode=False,
            deterministic=True,
            rngs=rngs,
            kernel_metadata={"out_sharding": ("embed", "heads", "head_dim")},
            bias_metadata={"out_sharding": ("heads", "head_dim")},
            out_kernel_metadata={"out_sharding": ("heads", "head_dim", "embed")},
            out_bias_metadata={"out_sharding": ("embed",)},
        )
        # The parent gives k/v the query's axis names; GQA wants its own so kv heads can be replicated
        # when the tensor axis exceeds them. Its bias flag also covers `out`, which Qwen2 lacks.
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init(cfg), rngs=rngs)
        kv = dict(
            out_features=(cfg.n_kv_heads, hd),
            use_bias=cfg.qkv_bias,
            kernel_metadata={"out_sharding": ("embed", "kv_heads", "head_dim")},
            bias_metadata={"out_sharding": ("kv_heads", "head_dim")},
        )
        self.key = nnx.LinearGeneral(cfg.d_model, **kv, **linear)
        self.value = nnx.LinearGeneral(cfg.d_model, **kv, **linear)
        if cfg.attn_out_bias != cfg.qkv_bias:
            self.out = nnx.LinearGeneral(
                (cfg.n_heads, hd),
                cfg.d_model,
                axis=(-2, -1),
                use_bias=cfg.attn_out_bias,
                kernel_metadata={"out_sharding": ("heads", "head_dim", "embed")},
                bias_metadata={"out_sharding": ("embed",)},
                **{**linear, "kernel_init": kernel_init(cfg, residual=True)},
            )
        if cfg.qk_norm:
            self.normalize_qk = True
            norm = dict(
                epsilon=cfg.norm_eps,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
                scale_metadata={"out_sharding": ("head_dim",)},
            )
            self.query_ln = nnx.RMSNorm(hd, **norm)
            self.key_ln = nnx.RMSNorm(hd, **norm)
        self.cfg = cfg

    def init_cache(self, input_shape, dtype=jnp.float32):
        """Zeroed cache [batch, max_length, kv_heads, head_dim] for input_shape (batch, max_length, ...)."""
        batch, max_length = input_shape[:2]
        shape = (batch, max_length, self.num_kv_heads, self.head_dim)
        names = ("batch", "cache_length", "kv_heads", "head_dim")
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=names)
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=names)

    def __call__(self, x, positions, segment_ids=None, *, mode: Mode = "train", sliding_window=None):
        """x: [batch, length, d_model]; positions, segment_ids: [batch, length] (segment 0 = padding).
        sliding_window: None, or this layer's window (an int, or a traced int inside the layer scan)."""
        cfg = self.cfg
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.normalize_qk:
            q, k = self.query_ln(q), self.key_ln(k)
        if cfg.positions == "rope":
            inv_freq = rope_frequencies(cfg)
            q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        options = dict(
            sliding_window=sliding_window,
            softcap=cfg.attn_softcap,
            scale=None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5,
        )
        q = logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))

        if segment_ids is None:
            segment_ids = jnp.ones(positions.shape, jnp.int32)
        if mode == "decode":
            if x.shape[1] != 1:
                raise ValueError(f"decode mode takes one token per row, got length {x.shape[1]}")
            rows, at = jnp.arange(x.shape[0]), positions[:, 0]
            # A position past the cache would be silently dropped; the decode loop checks lengths first.
            self.cached_key[...] = self.cached_key[...].at[rows, at].set(k[:, 0].astype(self.cached_key.dtype))
            self.cached_value[...] = self.cached_value[...].at[rows, at].set(v[:, 0].astype(self.cached_value.dtype))
            k, v = self.cached_key[...].astype(q.dtype), self.cached_value[...].astype(q.dtype)
            kv_len = k.shape[1]
            mask = jnp.arange(kv_len)[None, :] <= at[:, None]
            if sliding_window is not None:
                mask = mask & (at[:, None] - jnp.arange(kv_len)[None, :] < sliding_window)
            out = dot_product_attention(q, k, v, mask[:, None, None, :], "xla", causal=False, **options)
        else:
            if mode == "prefill":
                length = x.shape[1]
                self.cached_key[...] = self.cached_key[...].at[:, :length].set(k.astype(self.cached_key.dtype))
                self.cached_value[...] = self.cached_value[...].at[:, :length].set(v.astype(self.cached_value.dtype))
            out = dot_product_attention(
                q,
                k,
                v,
                attention_mask(segment_ids, sliding_window),
                cfg.attention_impl,
                causal=True,
                segment_ids=segment_ids,
                **options,
            )
        out = logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return self.out(out)
