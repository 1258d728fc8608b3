"""Attention kernels behind one function, `attention`, and the one table of which kernel runs where.

The model calls `attention` and never names a platform. `model.attention_impl=auto` picks the
platform's flash kernel (cuDNN on NVIDIA GPUs, splash on TPUs) where it computes the layer exactly,
and XLA otherwise; an explicit kernel is trusted, so it can be lowered for another platform.
A decode step (one query per row over the KV cache) always runs in XLA: it is a matrix-vector
product that no flash kernel speeds up.
"""

import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.errors import UserError
from lm.hardware import platform as platform_of
from lm.kernels import context, cudnn, grouped, splash, xla

AUTO = {"tpu": "splash", "gpu": "cudnn"}  # the flash kernel `auto` picks on each platform
NEEDS = {"cudnn": "gpu", "splash": "tpu", "megablox": "tpu"}  # the platform each real kernel needs (*_interpret: any)


def _local_gpu_capability() -> tuple[int, int]:
    """Compute capability of this host's first GPU, e.g. (9, 0) for an H100; (0, 0) if unknown."""
    try:
        major, minor = jax.local_devices(backend="gpu")[0].compute_capability.split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - no GPU backend, or a device without the attribute (ROCm)
        return (0, 0)


def for_platform(impl: str, platform: str | None = None) -> str:
    """An explicit kernel this platform cannot run becomes `auto`: a checkpoint trained with splash on
    a TPU (or cuDNN on a GPU) generates anywhere with the kernel this platform has."""
    return "auto" if impl in NEEDS and NEEDS[impl] != platform_of(platform) else impl


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
    platform = platform_of(platform)
    traced_window = isinstance(sliding_window, jax.core.Tracer)
    if requested == "auto":
        requested = AUTO.get(platform, "xla")
        if requested == "xla":
            return "xla", f"auto on {platform}: no flash kernel for this platform"
    if requested in ("splash", "splash_interpret"):
        if traced_window:
            return "xla", "splash needs a static sliding window (this layer's window is traced under scan)"
        return requested, "splash: causal block-sparse Pallas kernel, native GQA, padded to its block size"
    if requested == "cudnn":
        hopper = platform == "gpu" and (gpu_capability or _local_gpu_capability()) >= (9, 0)
        max_head_dim = 256 if hopper else 128
        if jnp.dtype(dtype) not in cudnn.DTYPES:
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
    context_devices: int = 1,
) -> tuple[str, str]:
    """The attention implementation a run on `platform` will use for sequences of `seq_len`, and why.

    For the one log line at start-up (the model itself never prints). An explicit kernel that cannot
    run on this platform is a UserError here, before anything is compiled. context_devices: the devices a
    sequence is split over (mesh.context); above 1, `context.context_attention` runs instead.
    """
    platform = platform_of(platform)
    impl = cfg.attention_impl
    if impl in NEEDS and platform != NEEDS[impl]:
        hint = ""
        if impl == "splash":
            hint = " (or splash_interpret to run the Pallas kernel interpreted, slowly, for tests)"
        raise UserError(
            f"model.attention_impl={impl} needs a {NEEDS[impl].upper()}, but this run is on {platform}; "
            f"use model.attention_impl=auto or xla{hint}"
        )
    dtype = cfg.compute_dtype_on(platform)
    chosen, reason = choose_attention_impl(
        impl, platform, dtype=dtype, head_dim=cfg.dim_per_head, packed=packed, softcap=softcap,
        sliding_window=sliding_window, gpu_capability=gpu_capability,
    )  # fmt: skip
    if context_devices > 1 and seq_len % context_devices == 0:
        mode, n = cfg.context_parallel, context_devices
        blocks = f"an online softmax over XLA key blocks of {context.KEY_BLOCK}"
        traced = cfg.scan_layers and any(cfg.sliding_layers) and not all(cfg.sliding_layers)
        if context.shard_kernel(chosen, mode, seq_len, n) == "xla":
            inside = f"each shard {blocks} (key blocks no query of the shard sees are skipped)"
        elif traced:
            inside = f"each shard {blocks} ({chosen} needs a static window; the layers' windows are traced in the scan)"
        elif mode == "ring":
            inside = (
                f"each shard {chosen} per pair of query and key chunks as the K/V come round the ring (causal on "
                "the diagonal, mask-free below it), merged by log-sum-exp"
            )
            if any(cfg.sliding_layers):  # a window would cut a mask-free pair by distance
                inside += f"; windowed layers: {blocks}"
        else:
            inside = (
                f"each shard {chosen} over the gathered K/V, its mask built for the queries' order "
                "(zig-zag in training, eval and scoring; natural at prefill)"
            )
        return mode, f"mesh.context={n}: {mode} context parallelism, {inside}"
    if chosen.startswith("splash"):
        padded = splash.padded_length(seq_len)
        reason += f" (length {seq_len} -> {padded}, block {splash.block_size(padded)})"
    return chosen, reason


def attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    impl: str = "auto",
    packed: bool = True,
    sliding_window=None,
    softcap: float | None = None,
    scale: float | None = None,
    max_segments: int = 32,
    decode_positions=None,
    own=None,
    chunk_positions=None,
    positions=None,
    context_parallel: str = "allgather",
):
    """Attention by the chosen kernel: causal self-attention over whole sequences, or (with
    `decode_positions`) one decode step over the KV cache.

    Self-attention: q [batch, length, heads, head_dim], k/v [batch, length, kv_heads, head_dim].
    Decode: q [batch, 1, heads, head_dim], k/v the heads-major cache [batch, kv_heads, cache_length,
    head_dim], decode_positions int [batch] (each row's slot), own (k, v) [batch, kv_heads, head_dim]
    of the token being decoded (see `xla.cached_attention`).
    Chunked prefill: q [batch, chunk, heads, head_dim] over the heads-major cache k/v, with its tokens
    already written; chunk_positions int [batch, chunk] (see `xla.chunk_attention`).

    segment_ids [batch, length] keep packed documents apart (0 = padding): each kernel gets
    causality, documents and the window in its own form, never a dense [T, T] mask.
    packed=False promises one right-padded document per row (prefill), which cuDNN takes as lengths.
    sliding_window: each query sees itself and the W-1 keys before it (Mistral/Gemma); an int, or a
      traced per-layer value (then XLA). softcap: Gemma 2's tanh cap on the scaled logits.
    scale: logit scale, default head_dim ** -0.5.
    max_segments: documents per packed row that cuDNN can keep apart (model.max_segments).
    impl: model.attention_impl; `auto` picks by jax.default_backend() at trace time.
    positions [batch, length]: where the `length` rule splits the sequence over devices (mesh.context),
    attention runs by `context.context_attention` in mode `context_parallel` (allgather or ring).
    """
    if decode_positions is not None:
        return xla.cached_attention(
            q, k, v, decode_positions, own, sliding_window=sliding_window, scale=scale, softcap=softcap
        )
    if chunk_positions is not None:
        options = dict(sliding_window=sliding_window, scale=scale, softcap=softcap)
        return xla.chunk_attention(q, k, v, chunk_positions, **options)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    chosen, _ = choose_attention_impl(
        impl, jax.default_backend(), dtype=q.dtype, head_dim=q.shape[-1],
        packed=packed, softcap=softcap, sliding_window=sliding_window,
    )  # fmt: skip
    if positions is not None and context.context_size(q.shape[1]) > 1:
        return context.context_attention(
            q, k, v, segment_ids, positions, mode=context_parallel, kernel=chosen, sliding_window=sliding_window,
            scale=scale, softcap=softcap,
        )  # fmt: skip
    if chosen in ("splash", "splash_interpret"):
        return splash.splash_attention(
            q, k, v, segment_ids, scale=scale, softcap=softcap, sliding_window=sliding_window,
            interpret=chosen == "splash_interpret",
        )  # fmt: skip
    if chosen == "cudnn":
        return cudnn.cudnn_causal(
            q, k, v, segment_ids, packed=packed, scale=scale, sliding_window=sliding_window, max_segments=max_segments
        )
    return xla.causal_xla_attention(q, k, v, segment_ids, sliding_window=sliding_window, scale=scale, softcap=softcap)


def choose_grouped_impl(requested: str, platform: str, lhs_shape, rhs_shape) -> tuple[str, str]:
    """(implementation, reason) for one grouped matmul (model.moe_impl): megablox on TPUs where its
    tiles divide the widths, XLA's tiled scan on CPU (where ragged_dot multiplies every row by every
    group), XLA's ragged_dot elsewhere."""
    if requested == "auto":
        if platform_of(platform) == "cpu":
            return "tiled", "auto on cpu: a scan over row tiles (XLA:CPU's ragged_dot multiplies by every group)"
        if platform_of(platform) != "tpu":
            return "ragged_dot", f"auto on {platform_of(platform)}: XLA's ragged_dot"
        requested = "megablox"
    if requested.startswith("megablox") and not grouped.megablox_fits(lhs_shape, rhs_shape):
        return "ragged_dot", f"megablox needs widths that are multiples of {grouped.TILE}, got {tuple(rhs_shape[1:])}"
    return requested, f"{requested}: requested"


def grouped_matmul(lhs, rhs, group_sizes, *, impl: str = "auto"):
    """lhs [rows, in] sorted by group, rhs [groups, in, out], group_sizes int [groups] -> [rows, out]:
    row r of group g is lhs[r] @ rhs[g]; rows past sum(group_sizes) come out zero. No [rows, groups, ...]
    intermediate exists (the dropless MoE dispatch)."""
    chosen, _ = choose_grouped_impl(impl, jax.default_backend(), lhs.shape, rhs.shape)
    if chosen.startswith("megablox"):
        return grouped.megablox(lhs, rhs, group_sizes, interpret=chosen == "megablox_interpret")
    if chosen == "tiled":
        return grouped.tiled(lhs, rhs, group_sizes)
    return grouped.ragged_dot(lhs, rhs, group_sizes)
