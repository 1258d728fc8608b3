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
from lm.errors import UserError
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
    sin, cos = jnp.sin(angles)[:, :, None, None, :], jnp.cos(angles)[:, :, None, None, :]
    # The halves as an axis of their own ([..., 2, half]) rather than split and concatenated along
    # head_dim: the same numbers, and the layer's backward pass is 10% faster on XLA:CPU.
    halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    x1, x2 = halves[..., :1, :], halves[..., 1:, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-2).reshape(x.shape).astype(x.dtype)


def _causal_mask(segment_ids, q_lo: int, q_hi: int, kv_lo: int, kv_hi: int, sliding_window=None) -> jax.Array:
    """bool [batch, q_hi - q_lo, kv_hi - kv_lo]: the causal, same-document (and window) mask of
    queries [q_lo, q_hi) against keys [kv_lo, kv_hi) of one sequence."""
    q, kv = jnp.arange(q_lo, q_hi)[:, None], jnp.arange(kv_lo, kv_hi)[None, :]
    causal = q >= kv
    if sliding_window is not None:
        causal = causal & (q - kv < sliding_window)
    same_doc = segment_ids[:, q_lo:q_hi, None] == segment_ids[:, None, kv_lo:kv_hi]
    return causal[None] & same_doc


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CACHE_LENGTH_AXIS = -2  # the KV cache is heads-major: [..., kv_heads, cache_length, head_dim]


def heads_major(x: jax.Array) -> jax.Array:
    """[batch, length, heads, head_dim] -> [batch, heads, length, head_dim]."""
    return x.transpose(0, 2, 1, 3)


def attend(q, k, v, mask, *, scale=None, softcap=None, own=None):
    """Softmax attention on heads-major arrays, the form XLA's batched matmuls take without copies.

    q: [batch, kv_heads, group, q_len, head_dim] (GQA: the query heads of each kv head grouped, K/V
    never repeated); k, v: [batch, kv_heads, kv_len, head_dim]; mask: bool, broadcastable to
    [batch, 1, 1, q_len, kv_len]. Scores and softmax are float32, as in transformers' eager
    attention. Returns [batch, kv_heads, group, q_len, head_dim].
    own: (k, v) [batch, kv_heads, q_len, head_dim] of the queries' own tokens, which each query
    attends besides k/v. A decode step passes its token this way instead of reading it back from the
    cache it is writing: a read after the write made XLA copy every layer's cache every step.
    """
    batch, kv_heads, group, q_len, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale

    def capped(scores):
        scores = scores * scale
        return scores if softcap is None else softcap * jnp.tanh(scores / softcap)

    # The group and query axes are merged for the matmuls and the softmax: with a separate group
    # axis, XLA:CPU ran them about 1.5x slower.
    rows = (batch, kv_heads, group * q_len)
    scores = capped(jnp.einsum("bkxd,bksd->bkxs", q.reshape(*rows, head_dim), k, preferred_element_type=jnp.float32))
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, group, q_len, mask.shape[-1]))
    mask = mask.reshape(mask.shape[0], 1, *rows[2:], -1)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    if own is not None:
        own_k, own_v = own
        own_scores = jnp.einsum("bkgqd,bkqd->bkgq", q, own_k, preferred_element_type=jnp.float32)
        scores = jnp.concatenate([scores, capped(own_scores).reshape(*rows, 1)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if own is None:
        return jnp.einsum("bkxs,bksd->bkxd", probs, v).reshape(batch, kv_heads, group, q_len, head_dim)
    out = jnp.einsum("bkxs,bksd->bkxd", probs[..., :-1], v).reshape(batch, kv_heads, group, q_len, head_dim)
    return out + probs[..., -1].reshape(batch, kv_heads, group, q_len, 1) * own_v[:, :, None]


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [batch, length, heads, head_dim] -> [batch, kv_heads, group, length, head_dim] for `attend`."""
    batch, length, heads, head_dim = q.shape
    return q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)


def ungroup_queries(out: jax.Array) -> jax.Array:
    """`attend`'s [batch, kv_heads, group, length, head_dim] -> [batch, length, heads, head_dim]."""
    batch, kv_heads, group, length, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, kv_heads * group, head_dim)


def query_blocks(length: int) -> int:
    """How many query blocks causal XLA attention splits a sequence into: blocks of at least 64
    queries, at most 8 of them, dividing the length."""
    n = max(1, min(8, length // 64))
    while length % n:
        n -= 1
    return n


def causal_xla_attention(q, k, v, segment_ids, *, sliding_window=None, scale=None, softcap=None):
    """Causal self-attention in plain XLA, one block of queries at a time.

    Block i (queries [i*b, (i+1)*b)) attends key blocks 0..i only, so the masked upper triangle
    is mostly never computed: 4 blocks skip 3/8 of the scores' FLOPs and bytes. On the small
    benchmark shape this took the attention's forward and backward from 35 to 15 ms per layer
    (docs/benchmarks.md). A static sliding window also drops the key blocks wholly before every
    query's window. q, k and v are split into blocks (`jnp.split`) and each block's keys are the
    concatenation of its key blocks: in the backward pass that is slices and one concatenation,
    where prefix slices of k and v gave every block's gradient padded to the whole length and
    summed (the sub-block's forward and backward: 64.4 -> 60.9 ms).
    q: [batch, length, heads, head_dim], k/v: [batch, length, kv_heads, head_dim], segment_ids:
    [batch, length] (0 = padding).
    """
    length, kv_heads = q.shape[1], k.shape[2]
    n = query_blocks(length)
    size = length // n
    qs = jnp.split(group_queries(q, kv_heads), n, axis=3)
    ks, vs = jnp.split(heads_major(k), n, axis=2), jnp.split(heads_major(v), n, axis=2)
    static_window = isinstance(sliding_window, int)
    outs = []
    for i in range(n):
        first = max(0, i * size - sliding_window + 1) // size if static_window else 0
        mask = _causal_mask(segment_ids, i * size, (i + 1) * size, first * size, (i + 1) * size, sliding_window)
        keys, values = (ks[first], vs[first]) if first == i else (
            jnp.concatenate(ks[first : i + 1], axis=2), jnp.concatenate(vs[first : i + 1], axis=2))  # fmt: skip
        outs.append(attend(qs[i], keys, values, mask[:, None, None], scale=scale, softcap=softcap))
    return ungroup_queries(jnp.concatenate(outs, axis=3) if n > 1 else outs[0])


def _platform(name: str) -> str:
    """jax's names for an NVIDIA GPU ('gpu', 'cuda') folded to 'gpu'; 'tpu', 'cpu', 'rocm' unchanged."""
    return "gpu" if name in ("gpu", "cuda") else name


def _local_gpu_capability() -> tuple[int, int]:
    """Compute capability of this host's first GPU, e.g. (9, 0) for an H100; (0, 0) if unknown."""
    try:
        major, minor = jax.local_devices(backend="gpu")[0].compute_capability.split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - no GPU backend, or a device without the attribute (ROCm)
        return (0, 0)


def choose_attention_impl(
    requested: str,
    platform: str,
    *,
    dtype,
    head_dim: int,
    packed: bool = True,
    softcap: float | None = None,
    sliding_window=None,
    gpu_capability: tuple[int, int] | None = None,
) -> tuple[str, str]:
    """(implementation, reason) for one causal self-attention call: the one rule the dispatcher and
    `resolve_attention_impl` share. `platform` is where this process runs (jax.default_backend());
    `auto` picks by it, an explicit kernel is trusted (so it can be lowered for another platform).
    gpu_capability: the GPU's compute capability, default this host's.

    A kernel is used only for what it computes exactly; anything else falls back to XLA with the reason.
    """
    platform = _platform(platform)
    traced_window = isinstance(sliding_window, jax.core.Tracer)
    if requested == "auto":
        requested = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
        if requested == "xla":
            return "xla", f"auto on {platform}: no flash kernel for this platform"
    if requested in ("splash", "splash_interpret"):
        if traced_window:
            return "xla", "splash needs a static sliding window (this layer's window is traced under scan)"
        return requested, "splash: causal block-sparse Pallas kernel, native GQA, padded to its block size"
    if requested == "cudnn":
        hopper = platform == "gpu" and (gpu_capability or _local_gpu_capability()) >= (9, 0)
        max_head_dim = 256 if hopper else 128
        if jnp.dtype(dtype) not in CUDNN_DTYPES:
            return "xla", f"cuDNN flash attention has no {jnp.dtype(dtype).name} kernel (bfloat16/float16 only)"
        if head_dim > max_head_dim or head_dim % 8:
            return "xla", f"cuDNN flash attention needs head_dim <= {max_head_dim} and a multiple of 8, got {head_dim}"
        if softcap is not None:
            return "xla", "cuDNN flash attention has no logit soft-capping"
        if traced_window:
            return "xla", "cuDNN needs a static sliding window (this layer's window is traced under scan)"
        if packed and platform == "gpu" and not hopper:
            return "xla", "cuDNN keeps packed documents apart only on Hopper or newer GPUs (compute capability 9.0)"
        if packed:
            return "cudnn", "cudnn: causal, packed documents as cuDNN segments (no dense mask)"
        return "cudnn", "cudnn: causal with per-row lengths (no dense mask)"
    return "xla", "xla: requested"


def resolve_attention_impl(
    cfg: ModelConfig,
    platform: str,
    seq_len: int,
    *,
    packed: bool = True,
    softcap=None,
    sliding_window=None,
    gpu_capability: tuple[int, int] | None = None,
) -> tuple[str, str]:
    """The attention implementation a run on `platform` will use for sequences of `seq_len`, and why.

    For the one log line at start-up (the model itself never prints). An explicit kernel that cannot
    run on this platform is a UserError here, before anything is compiled.
    """
    platform = _platform(platform)
    impl = cfg.attention_impl
    needs = {"cudnn": "gpu", "splash": "tpu"}
    if impl in needs and platform != needs[impl]:
        hint = ""
        if impl == "splash":
            hint = " (or splash_interpret to run the Pallas kernel interpreted, slowly, for tests)"
        raise UserError(
            f"model.attention_impl={impl} needs a {needs[impl].upper()}, but this run is on {platform}; "
            f"use model.attention_impl=auto or xla{hint}"
        )
    dtype = cfg.compute_dtype if cfg.dtype != "auto" else (jnp.bfloat16 if platform in ("gpu", "tpu") else jnp.float32)
    chosen, reason = choose_attention_impl(
        impl, platform, dtype=dtype, head_dim=cfg.dim_per_head, packed=packed, softcap=softcap,
        sliding_window=sliding_window, gpu_capability=gpu_capability,
    )  # fmt: skip
    if chosen.startswith("splash"):
        from lm.splash import block_size, padded_length

        padded = padded_length(seq_len)
        reason += f" (length {seq_len} -> {padded}, block {block_size(padded)})"
    return chosen, reason


def segment_lengths_and_offsets(segment_ids: jax.Array, max_segments: int):
    """cuDNN's packed layout from segment ids [batch, length] (contiguous runs, 0 = padding).

    Returns (lengths, offsets, count): int32 [batch, max_segments] run lengths and
    [batch, max_segments + 1] run starts, both filled with -1 past the row's last document, and
    the number of documents in each row [batch].
    """

    def row(seg):
        length = seg.shape[0]
        change = jnp.concatenate([jnp.ones((1,), bool), seg[1:] != seg[:-1]])
        starts = jnp.nonzero(change & (seg != 0), size=max_segments + 1, fill_value=length)[0]
        boundaries = jnp.nonzero(change, size=length, fill_value=length)[0]
        ends = jnp.append(boundaries, length)[jnp.searchsorted(boundaries, starts, side="right")]
        real = starts < length
        lengths = jnp.where(real, ends - starts, -1)[:max_segments]
        return lengths.astype(jnp.int32), jnp.where(real, starts, -1).astype(jnp.int32), jnp.sum(change & (seg != 0))

    return jax.vmap(row)(segment_ids)


def _cudnn_causal(q, k, v, segment_ids, *, packed: bool, scale, sliding_window, max_segments: int):
    """cuDNN flash attention with causality and documents passed as lengths, never as a [T, T] mask.

    packed=False (prefill): each row is one right-padded document; its length is the count of
    non-zero segment ids. packed=True (training): the row's documents become cuDNN's packed
    ("THD") segments, at most `max_segments` per row (a Hopper GPU feature). A row with more
    documents than that gets NaN outputs, so the loss says so instead of mixing documents.
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    window = None if sliding_window is None else int(sliding_window)
    real = (segment_ids != 0)[:, :, None, None]
    if not packed:
        lengths = jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)
        out = cudnn_attention(
            q, k, v, q_seqlen=lengths, kv_seqlen=lengths, scale=scale, mask_type=MaskType.PADDING_CAUSAL,
            sliding_window_length=window,
        )  # fmt: skip
        return jnp.where(real, out, 0)  # cuDNN leaves padding rows unwritten; they feed the cache's unused slots
    max_segments = max(2, max_segments)  # one segment per row is the unpacked layout, not this one
    if k.shape[2] != q.shape[2]:
        # jax 0.10.2 scales K/V's packed offsets by the *query* heads' stride
        # (_fix_seqlen_offsets), which is only right when K/V have as many heads.
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
    lengths, offsets, count = segment_lengths_and_offsets(segment_ids, max_segments)
    out = cudnn_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets, scale=scale,
        mask_type=MaskType.PADDING_CAUSAL, sliding_window_length=window,
    )  # fmt: skip
    # Padding rows are left unwritten; too many documents poison the row instead of mixing them.
    out = jnp.where(real, out, 0)
    return jnp.where((count <= max_segments)[:, None, None, None], out, jnp.nan)


def dot_product_attention(
    q,
    k,
    v,
    impl: str = "xla",
    segment_ids=None,
    *,
    packed: bool = True,
    sliding_window=None,
    softcap: float | None = None,
    scale: float | None = None,
    max_segments: int = 32,
):
    """Causal self-attention over one sequence, by the chosen kernel. q: [batch, length, heads,
    head_dim], k/v: [batch, length, kv_heads, head_dim].

    segment_ids [batch, length] keep packed documents apart (0 = padding): each kernel gets
    causality, documents and the window in its own form, never a dense [T, T] mask.
    packed=False promises one right-padded document per row (prefill), which cuDNN takes as lengths.
    sliding_window: each query sees itself and the W-1 keys before it (Mistral/Gemma); an int, or a
      traced per-layer value (then XLA). softcap: Gemma 2's tanh cap on the scaled logits.
    scale: logit scale, default head_dim ** -0.5.
    max_segments: documents per packed row that cuDNN can keep apart (model.max_segments).
    impl: model.attention_impl; `auto` picks by jax.default_backend() at trace time.
    A decode step (one query over the cache) calls `attend` directly.
    """
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    chosen, _ = choose_attention_impl(
        impl, jax.default_backend(), dtype=q.dtype, head_dim=q.shape[-1],
        packed=packed, softcap=softcap, sliding_window=sliding_window,
    )  # fmt: skip
    if chosen in ("splash", "splash_interpret"):
        from lm.splash import splash_attention  # imported lazily: only TPU runs need Pallas

        return splash_attention(
            q, k, v, segment_ids, scale=scale, softcap=softcap, sliding_window=sliding_window,
            interpret=chosen == "splash_interpret",
        )  # fmt: skip
    if chosen == "cudnn":
        return _cudnn_causal(
            q, k, v, segment_ids, packed=packed, scale=scale, sliding_window=sliding_window, max_segments=max_segments
        )
    return causal_xla_attention(q, k, v, segment_ids, sliding_window=sliding_window, scale=scale, softcap=softcap)


def per_token(layer: nnx.Module, x: jax.Array, n_in: int = 1) -> jax.Array:
    """Apply a projection with the batch and length axes merged into one token axis.

    The weight gradient then contracts over a single axis. Contracting over (batch, length) makes
    XLA:CPU transpose the output gradient into [features, tokens] before the matmul, fused with the
    elementwise backward ops in a cache-hostile order: that made the small-shape backward pass
    several times slower than its FLOPs (docs/benchmarks.md, "Where the training step spends its time").
    n_in: how many trailing axes of x the layer contracts.
    """
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
        """Zeroed cache [batch, kv_heads, max_length, head_dim] for input_shape (batch, max_length, ...).

        Heads-major, the layout `attend` reads: a decode step's attention then reads the cache in
        place, where a [batch, length, heads, head_dim] cache is copied transposed every step, a
        copy that grows with the context (docs/benchmarks.md).
        """
        batch, max_length = input_shape[:2]
        shape = (batch, self.num_kv_heads, max_length, self.head_dim)
        names = ("batch", "kv_heads", "cache_length", "head_dim")
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=names)
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=names)

    def __call__(self, x, positions, segment_ids=None, *, mode: Mode = "train", sliding_window=None):
        """x: [batch, length, d_model]; positions, segment_ids: [batch, length] (segment 0 = padding).
        sliding_window: None, or this layer's window (an int, or a traced int inside the layer scan)."""
        cfg = self.cfg
        q, k, v = per_token(self.query, x), per_token(self.key, x), per_token(self.value, x)
        if self.normalize_qk:
            q, k = self.query_ln(q), self.key_ln(k)
        if cfg.positions == "rope":
            inv_freq = rope_frequencies(cfg)
            q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        q = logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))

        if segment_ids is None:
            segment_ids = jnp.ones(positions.shape, jnp.int32)
        if mode == "decode":
            if x.shape[1] != 1:
                raise ValueError(f"decode mode takes one token per row, got length {x.shape[1]}")
            rows, at = jnp.arange(x.shape[0]), positions[:, 0]
            cached_k, cached_v = self.cached_key[...], self.cached_value[...]
            new_k, new_v = k[:, 0].astype(cached_k.dtype), v[:, 0].astype(cached_v.dtype)
            slots = jnp.arange(cached_k.shape[2])[None, :]
            mask = slots < at[:, None]  # the slots before this token; the token itself comes as `own`
            if sliding_window is not None:
                mask = mask & (at[:, None] - slots < sliding_window)
            own = (new_k[:, :, None].astype(q.dtype), new_v[:, :, None].astype(q.dtype))
            out = attend(group_queries(q, self.num_kv_heads), cached_k.astype(q.dtype), cached_v.astype(q.dtype),
                         mask[:, None, None, None], scale=scale, softcap=cfg.attn_softcap, own=own)  # fmt: skip
            # A position past the cache would be silently dropped; the decode loop checks lengths first.
            self.cached_key[...] = cached_k.at[rows, :, at].set(new_k)
            self.cached_value[...] = cached_v.at[rows, :, at].set(new_v)
            out = ungroup_queries(out)
        else:
            if mode == "prefill":
                length = x.shape[1]
                self.cached_key[...] = self.cached_key[...].at[:, :, :length].set(
                    heads_major(k).astype(self.cached_key.dtype)
                )
                self.cached_value[...] = self.cached_value[...].at[:, :, :length].set(
                    heads_major(v).astype(self.cached_value.dtype)
                )
            out = dot_product_attention(
                q, k, v, cfg.attention_impl, segment_ids=segment_ids, packed=mode == "train",
                max_segments=cfg.max_segments, sliding_window=sliding_window, softcap=cfg.attn_softcap, scale=scale,
            )  # fmt: skip
        out = logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return per_token(self.out, out, n_in=2)
