"""The decoder-only Transformer: embed, a stack of Blocks, final norm, LM head.

Blocks are built once with `nnx.vmap` (every parameter gains a leading `layers` axis) and applied
with `nnx.scan`, so compile time does not grow with depth. `scan_layers=False` keeps a plain list
of Blocks applied in a Python loop; it gives the same numbers and is there for debugging and export.

Where dense and expert layers mix (`model.moe_layer_step`, `model.dense_layers`), the layers are
scanned in runs (`ModelConfig.layer_runs`): each run repeats a period of layers, one stack per place
in the period, and one scan applies the period. `layer_paths` says where each layer's Block lives.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ModelConfig
from lm.model.attention import Mode
from lm.model.blocks import Block, make_norm
from lm.model.moe import RouterStats
from sharding.rules import axes, logical_constraint

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def over_layers(f, in_axes):
    """f with the stacked `layers` axis taken off its Variables' logical names inside and put back on
    the way out, so that partition specs stay aligned under nnx.vmap and nnx.scan. nnx.transform_metadata
    does this in graph and tree mode alike (the transforms' own argument is ignored in tree mode)."""
    return nnx.transform_metadata(f, in_axes=in_axes, out_axes=0, partition="layers")


def unembed(x: jax.Array, head: jax.Array, softcap: float | None = None) -> jax.Array:
    """x [batch, length, d_model] @ head [d_model, vocab] -> float32 logits [batch, length, vocab],
    soft-capped to softcap * tanh(logits / softcap) when given (Gemma 2).

    Logits are accumulated in float32 from the compute dtype: the softmax over a large vocabulary
    loses too much precision in bf16. Tokens are flattened so the head's gradient contracts over one
    axis (see lm.model.attention.per_token).
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
        dtypes = dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)

        def embed(n: int, name: str) -> nnx.Embed:
            return nnx.Embed(n, cfg.d_model, embedding_init=embed_init, embedding_metadata=axes(name, "embed"),
                             **dtypes)  # fmt: skip

        self.embed = embed(cfg.vocab_size, "vocab")
        self.pos_embed = embed(cfg.max_seq_len, "position") if cfg.positions == "learned" else nnx.data(None)
        if cfg.scan_layers and _one_stack(cfg):
            self.blocks = stacked_blocks(cfg, cfg.moe_layers[0], cfg.n_layers, rngs)
        elif cfg.scan_layers:  # runs of a repeating period: blocks[run][place in the period]
            self.blocks = nnx.List(
                nnx.List(stacked_blocks(cfg, experts, repeats, rngs) for experts in period)
                for period, repeats in cfg.layer_runs
            )
        else:
            self.blocks = nnx.List([Block(cfg, experts=moe, rngs=rngs) for moe in cfg.moe_layers])
        self.final_norm = make_norm(cfg, rngs)
        self.lm_head = nnx.data(None)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(
                cfg.d_model, cfg.vocab_size, use_bias=False, kernel_init=embed_init,
                kernel_metadata=axes("embed", "vocab"), **dtypes,
            )  # fmt: skip

    def __call__(
        self,
        tokens,
        positions,
        segment_ids=None,
        *,
        mode: Mode = "train",
        return_hidden: bool = False,
        return_router: bool = False,
    ) -> jax.Array | tuple[jax.Array, RouterStats | None]:
        """tokens, positions, segment_ids: int [batch, length]. Returns float32 logits [batch, length, vocab].

        return_hidden: return the final-normed hidden states [batch, length, d_model] instead, for
        callers that apply the head to a few positions (prefill) or in chunks (the loss).
        return_router: also return the MoE layers' RouterStats, stacked [moe_layers, ...] (None when dense).
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
        per_layer = []  # RouterStats, [layers, ...] each, in layer order
        if self.cfg.scan_layers:
            start = 0
            for stacks, (period, repeats) in zip(self._runs(), self.cfg.layer_runs):
                # This run's windows, [repeats, len(period)]: each scanned step takes one period's.
                end = start + len(period) * repeats
                xs = () if windows is None else (windows[start:end].reshape(repeats, len(period)),)
                start = end
                if mode == "decode":
                    x = self._decode_scan(stacks, x, layer, *xs)
                    continue
                body = over_layers(functools.partial(_period, layer), in_axes=(0, None, *(None for _ in xs)))
                scan = nnx.scan(body, in_axes=(0, nnx.Carry, *(0 for _ in xs)), out_axes=(nnx.Carry, 0))
                x, stats = scan(stacks, x, *xs)
                if stats is not None:  # [repeats, expert layers in the period, ...] -> layer order
                    per_layer.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stats))
        else:
            for block, sliding in zip(self.blocks, self.cfg.sliding_layers):
                x, s = layer(block, x, self.cfg.sliding_window if sliding else None)
                per_layer += [jax.tree.map(lambda a: a[None], s)] if s is not None else []
        stats = jax.tree.map(lambda *a: jnp.concatenate(a), *per_layer) if per_layer else None

        x = self.final_norm(x)
        out = x if return_hidden else self.logits(x)
        return (out, stats) if return_router else out

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

    def _runs(self) -> list[list[Block]]:
        """The scanned stack as runs, each one stacked Block per place in its period."""
        return [[self.blocks]] if isinstance(self.blocks, Block) else [list(run) for run in self.blocks]

    def _decode_scan(self, stacks: list[Block], x, layer, windows=None):
        """One decode step through a run of stacked layers with the KV cache in the scan's carry.

        Scanned as input and output (nnx.scan's default), the whole cache would be copied once per
        generated token; as a carry, each layer's slice is updated in place.
        """
        graphdef, params, cache, rest = nnx.split(stacks, nnx.Param, nnx.Cache, ...)

        def body(carry, layer_state):
            x, cache, i = carry
            mine = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, i, keepdims=False), cache)
            blocks = nnx.merge(graphdef, layer_state[0], mine, layer_state[1])
            x, _ = _period(layer, blocks, x, *layer_state[2:])
            cache = jax.tree.map(
                lambda c, new: jax.lax.dynamic_update_index_in_dim(c, new, i, 0), cache, nnx.state(blocks, nnx.Cache)
            )
            return (x, cache, i + 1), None

        xs = (params, rest) if windows is None else (params, rest, windows)
        (x, cache, _), _ = jax.lax.scan(body, (x, cache, 0), xs)
        nnx.update(stacks, cache)
        return x

    def init_cache(self, batch: int, max_length: int, dtype=jnp.float32):
        """Allocate every layer's KV cache: [layers, batch, kv_heads, max_length, head_dim] per stack
        when scanned (made whole on the stack, not inside a transform, so it works in graph and tree
        mode alike)."""
        if self.cfg.scan_layers:
            for stacks, (_, repeats) in zip(self._runs(), self.cfg.layer_runs):
                for stack in stacks:
                    stack.attn.init_cache((batch, max_length), dtype, layers=repeats)
        else:
            for block in self.blocks:
                block.attn.init_cache((batch, max_length), dtype)


def _one_stack(cfg: ModelConfig) -> bool:
    """Every layer alike: the scanned model is one stack `blocks` (a mixed one nests runs in it)."""
    return len(cfg.layer_runs) == 1 and len(cfg.layer_runs[0][0]) == 1


def stacked_blocks(cfg: ModelConfig, experts: bool, n: int, rngs: nnx.Rngs) -> Block:
    """n Blocks as one, every parameter with a leading `layers` axis of n."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    @functools.partial(over_layers, in_axes=(0,))
    def stack(rngs):
        return Block(cfg, experts=experts, rngs=rngs)

    return stack(rngs)


def _period(layer, blocks: list[Block], x, *windows):
    """One period of a run: its layers in order (windows: [period], each layer's, when they differ).
    Returns x and the period's RouterStats stacked [expert layers, ...] (None when it has none)."""
    stats = []
    for j, block in enumerate(blocks):
        x, s = layer(block, x, *(w[j] for w in windows))
        stats += [s] if s is not None else []
    return x, (jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else None)


def layer_paths(cfg: ModelConfig) -> list[tuple[tuple, int | None]]:
    """Where each layer's Block lives: (its module path, its index on that stack's leading `layers`
    axis, or None where layers are not stacked). Layer i's parameter `p` (a path inside a Block) is
    params[path + p][index]."""
    if not cfg.scan_layers:
        return [(("blocks", i), None) for i in range(cfg.n_layers)]
    if _one_stack(cfg):
        return [(("blocks",), i) for i in range(cfg.n_layers)]
    return [
        (("blocks", run, place), k)
        for run, (period, repeats) in enumerate(cfg.layer_runs)
        for k in range(repeats)
        for place in range(len(period))
    ]
