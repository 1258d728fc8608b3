"""cuDNN flash attention (NVIDIA GPUs) through jax's cuDNN binding, with causality, documents and
the window passed as lengths and offsets, never as a dense [T, T] mask (which jax would turn into
an O(T^2) bias operand)."""

import jax
import jax.numpy as jnp
from jax._src.cudnn.fused_attention_stablehlo import MaskType
from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention has no float32 kernel


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


def cudnn_causal(q, k, v, segment_ids, *, packed: bool, scale, sliding_window, max_segments: int):
    """cuDNN flash attention with causality and documents passed as lengths, never as a [T, T] mask.

    packed=False (prefill): each row is one right-padded document; its length is the count of
    non-zero segment ids. packed=True (training): the row's documents become cuDNN's packed
    ("THD") segments, at most `max_segments` per row (a Hopper GPU feature). A row with more
    documents than that gets NaN outputs, so the loss says so instead of mixing documents.
    """
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
