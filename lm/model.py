"""The decoder-only Transformer: embed, a stack of Blocks, final norm, LM head.

Blocks are built once with `nnx.vmap` (every parameter gains a leading `layers` axis) and applied
with `nnx.scan`, so compile time does not grow with depth. `scan_layers=False` keeps a plain list
of Blocks applied in a Python loop; it gives the same numbers and is there for debugging and export.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.attention import Mode
from lm.config import ModelConfig
from lm.layers import Block, make_norm
from sharding.rules import logical_constraint

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LAYERS = {nnx.PARTITION_NAME: "layers"}  # keeps partition specs aligned under vmap/scan (NNX_NOTES)


def unembed(x: jax.Array, head: jax.Array, softcap: float | None = None) -> jax.Array:
    """x [batch, length, d_model] @ head [d_model, vocab] -> float32 logits [batch, length, vocab],
    soft-capped to softcap * tanh(logits / softcap) when given (Gemma 2).

    Logits are accumulated in float32 from the compute dtype: the softmax over a large vocabulary
    loses too much precision in bf16. Tokens are flattened so the head's gradient contracts over one
    axis (see lm.attention.per_token).
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    logits = jnp.dot(flat, head.astype(x.dtype), preferred_element_type=jnp.float32).reshape(*lead, -1)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logical_constraint(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        embed_init = nnx.initializers.normal(cfg.init_std)
        dtype, param_dtype = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=embed_init,
            rngs=rngs,
            embedding_metadata={"out_sharding": ("vocab", "embed")},
        )
        self.pos_embed = nnx.data(None)
        if cfg.positions == "learned":
            self.pos_embed = nnx.Embed(
                cfg.max_seq_len,
                cfg.d_model,
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_init=embed_init,
                rngs=rngs,
                embedding_metadata={"out_sharding": ("position", "embed")},
            )
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYERS)
            def stack(rngs):
                return Block(cfg, rngs=rngs)

            self.blocks = stack(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg, rngs)
        self.lm_head = nnx.data(None)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=embed_init,
                rngs=rngs,
                kernel_metadata={"out_sharding": ("embed", "vocab")},
            )

    def __call__(
        self, tokens, positions, segment_ids=None, *, mode: Mode = "train", return_hidden: bool = False
    ) -> jax.Array:
        """tokens, positions, segment_ids: int [batch, length]. Returns float32 logits [batch, length, vocab].

        return_hidden: return the final-normed hidden states [batch, length, d_model] instead, for
        callers that apply the head to a few positions (prefill) or in chunks (the loss).
        """
        # FSDP gathers the table's width before the lookup (as it does for every weight), so the
        # result comes out split by batch rather than by width; vocab stays split over tensor.
        table = logical_constraint(self.embed.embedding[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(self.embed.dtype)
        if self.cfg.scale_embeddings:  # Gemma: the factor is rounded to the compute dtype, as in transformers
            x = x * jnp.asarray(self.cfg.d_model**0.5, x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = logical_constraint(x, ("batch", "length", "embed"))

        static_window = self._static_window()

        def layer(block: Block, x, *window):  # window: this layer's, when the stack's layers differ
            sliding_window = window[0] if window else static_window
            return block(x, positions, segment_ids, mode=mode, sliding_window=sliding_window)

        # Layers that differ only in their window (Gemma 2) share one scan: the window is a scanned input.
        windows = self._layer_windows()
        if self.cfg.remat != "none":
            layer = nnx.remat(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers and mode == "decode":
            x = self._decode_scan(x, layer, windows)
        elif self.cfg.scan_layers and windows is not None:
            scan = nnx.scan(layer, in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=LAYERS)
            x = scan(self.blocks, x, windows)
        elif self.cfg.scan_layers:
            x = nnx.scan(layer, in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata=LAYERS)(self.blocks, x)
        else:
            for block, sliding in zip(self.blocks, self.cfg.sliding_layers):
                x = layer(block, x, self.cfg.sliding_window if sliding else None)

        x = self.final_norm(x)
        return x if return_hidden else self.logits(x)

    def head(self) -> jax.Array:
        """The unembedding [d_model, vocab]: the LM head, or the embedding table when tied."""
        return self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def logits(self, x: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., d_model] -> float32 logits [..., vocab] (soft-capped for Gemma 2)."""
        return unembed(x, self.head(), self.cfg.final_softcap)

    def _static_window(self):
        """The sliding window when every layer has the same one (None: no window or per-layer)."""
        sliding = self.cfg.sliding_layers
        return self.cfg.sliding_window if all(sliding) else None

    def _layer_windows(self):
        """int32 [layers] windows for a stack whose layers differ (unbounded where a layer has none)."""
        sliding = self.cfg.sliding_layers
        if all(sliding) or not any(sliding):
            return None
        unbounded = np.iinfo(np.int32).max
        return jnp.asarray([self.cfg.sliding_window if s else unbounded for s in sliding], jnp.int32)

    def _decode_scan(self, x, layer, windows=None):
        """One decode step through the stacked layers with the KV cache in the scan's carry.

        Scanned as input and output (nnx.scan's default), the whole cache would be copied once per
        generated token; as a carry, each layer's slice is updated in place.
        """
        graphdef, params, cache, rest = nnx.split(self.blocks, nnx.Param, nnx.Cache, ...)

        def body(carry, layer_state):
            x, cache, i = carry
            mine = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, i, keepdims=False), cache)
            block = nnx.merge(graphdef, layer_state[0], mine, layer_state[1])
            x = layer(block, x) if windows is None else layer(block, x, layer_state[2])
            cache = jax.tree.map(
                lambda c, new: jax.lax.dynamic_update_index_in_dim(c, new, i, 0), cache, nnx.state(block, nnx.Cache)
            )
            return (x, cache, i + 1), None

        xs = (params, rest) if windows is None else (params, rest, windows)
        (x, cache, _), _ = jax.lax.scan(body, (x, cache, 0), xs)
        nnx.update(self.blocks, cache)
        return x

    def init_cache(self, batch: int, max_length: int, dtype=jnp.float32):
        """Allocate every layer's KV cache: [layers, batch, kv_heads, max_length, head_dim] when scanned."""
        if self.cfg.scan_layers:

            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYERS)
            def init(block: Block):
                block.attn.init_cache((batch, max_length), dtype)

            init(self.blocks)
        else:
            for block in self.blocks:
                block.attn.init_cache((batch, max_length), dtype)
