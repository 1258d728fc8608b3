"""Autoregressive generation: prefill into the KV cache (in one pass, or `model.prefill_chunk`
tokens at a time), then a jitted decode loop.

Under a mesh whose `length` rule splits sequences (mesh.context), the prefill's prompt is split over
those devices (context parallelism); the cache is not (its `cache_length` stays whole), so each
device decodes over the whole cache.

Prompts of different lengths are right-padded into one batch. Each row keeps its own position, so
row b's next token is written at cache slot lengths[b] + step. Shapes are bucketed to powers of
two, so new prompt lengths rarely recompile. The loop runs on the device (`lax.while_loop`) in
chunks: one chunk for throughput, small chunks when the caller streams tokens.

Each chunk also has a static attention window, the filled part of the cache rounded up to a power
of two or 1.5 times one (window_bucket): attention reads only the window's slots of the cache, so a
step's cost follows the context actually filled, not the allocated cache (which bounds prompt plus
new tokens).
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.errors import UserError
from lm.hardware import platform
from lm.infer.sampling import Sampling, apply_repetition_penalty, sample
from lm.kernels.context import context_size
from lm.kernels.xla import CACHE_LENGTH_AXIS
from lm.lora import adapters
from lm.model.transformer import layer_paths
from sharding.partition import place, to_host


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def window_bucket(n: int, minimum: int) -> int:
    """Smallest power of two or 1.5x a power of two that is >= n (and >= minimum): the decode loop's
    attention windows. A step then attends at most 1.5x the filled context (at 513 tokens: 768, not
    1,024), for two compilations per doubling instead of one."""
    whole = bucket(n, minimum)
    return whole * 3 // 4 if whole * 3 // 4 >= max(n, minimum) and whole % 4 == 0 else whole


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row, up to and including EOS
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int
    decode_steps: int  # loop iterations actually run (each makes one token per row)
    windows: tuple[int, ...] = ()  # the attention windows the cached decode loop ran with, in order

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.tokens) * self.decode_steps / max(self.decode_seconds, 1e-9)


def decode_twin(model: nnx.Module) -> nnx.Module:
    """The same model with its layers as a list of Blocks (scan_layers=False) and an untied head,
    sharing nothing.

    The cached loop decodes with this twin: inside a layer scan every step would slice (copy) each
    layer's weights out of the stack, doubling the bytes a memory-bound decode step moves. Separate
    per-layer arrays are read in place, and so are separate per-layer caches. A tied head is copied
    as [d_model, vocab]: XLA:CPU reads the embedding table transposed ([vocab, d_model] contracted on
    its last axis) more slowly (docs/benchmarks.md).
    """
    cfg = dataclasses.replace(model.cfg, scan_layers=False, tie_embeddings=False)
    twin = nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0)))
    source = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if model.cfg.tie_embeddings:
        source[("lm_head", "kernel")] = nnx.Param(model.head())
    target = nnx.state(twin, nnx.Param)
    where = layer_paths(model.cfg)
    for path, var in nnx.to_flat_state(target):
        if path[0] != "blocks":
            var.set_value(source[path].get_value())
            continue
        prefix, index = where[path[1]]
        value = source[prefix + path[2:]].get_value()
        var.set_value(value if index is None else value[index])
    nnx.update(twin, target)
    return twin


def _logits_at(logits, index):
    """logits [batch, length, vocab], index [batch] -> [batch, vocab]."""
    return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]


def _pick(logits, seen, key, step, sampling: Sampling):
    if sampling.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    return sample(logits, jax.random.fold_in(key, step), sampling)


def _mark_seen(seen, tokens):
    return seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"))
def _full_first(graphdef, params, buffer, lengths, key, seen, *, sampling):
    """The uncached path's first token: a plain forward pass over the padded buffer."""
    positions = jnp.broadcast_to(jnp.arange(buffer.shape[1]), buffer.shape)
    logits = nnx.merge(graphdef, params)(buffer, positions)
    return _pick(_logits_at(logits, lengths - 1), seen, key, 0, sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _prefill(graphdef, params, cache, tokens, lengths, key, seen, *, sampling):
    """Run every prompt through the model in one call, filling the cache; sample the first token."""
    model = nnx.merge(graphdef, params, cache)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    hidden = model(tokens, positions, segment_ids, mode="prefill", return_hidden=True)
    # Logits only where a token is sampled: each row's last prompt position.
    logits = model.logits(_logits_at(hidden, lengths - 1))
    first = _pick(logits, seen, key, 0, sampling)
    return nnx.state(model, nnx.Cache), first


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "chunk"), donate_argnames=("cache",))
def _prefill_chunked(graphdef, params, cache, tokens, lengths, key, seen, *, sampling, chunk: int):
    """`_prefill` one chunk of positions at a time (a scan over chunks, the cache in its carry): the
    activations and attention scores of one chunk are alive at once, not the whole prompt's.
    Where chunk does not divide the width, the last chunk ends at the width and overlaps the one
    before: it rewrites the same keys and values, and the cache never outgrows the prompt bucket."""
    batch, width = tokens.shape
    starts = jnp.asarray(np.minimum(np.arange(0, width, chunk), width - chunk), jnp.int32)

    def body(carry, start):
        cache, params, last = carry
        toks = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
        model = nnx.merge(graphdef, params, cache)
        positions = jnp.broadcast_to(start + jnp.arange(chunk), toks.shape)
        hidden = model(toks, positions, mode="chunk", return_hidden=True)
        at = lengths - 1 - start  # each row's last prompt token, if it is in this chunk
        here = (at >= 0) & (at < chunk)
        last = jnp.where(here[:, None], _logits_at(hidden, jnp.clip(at, 0, chunk - 1)), last)
        return (nnx.state(model, nnx.Cache), params, last), None

    model = nnx.merge(graphdef, params, cache)
    last = jnp.zeros((batch, model.cfg.d_model), model.cfg.compute_dtype)
    (cache, _, last), _ = jax.lax.scan(body, (cache, params, last), starts)
    return cache, _pick(model.logits(last), seen, key, 0, sampling)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What the decode loop carries from step to step, on the device."""

    last: jax.Array  # int32 [batch]: each row's newest token, the next step's input
    pos: jax.Array  # int32 [batch]: the position (cache slot) that token takes
    step: jax.Array  # int32 []: tokens generated so far; the next one goes to out[:, step]
    key: jax.Array  # the sampling key (each step folds in its number)
    done: jax.Array  # bool [batch]: rows that have ended (EOS or a stop)
    out: jax.Array  # int32 [batch, max_new_tokens]: the generated tokens
    seen: jax.Array  # bool [batch, vocab]: tokens already in each row (repetition penalty)
    cache: nnx.State | None = None  # the KV cache (cached decoding)
    buffer: jax.Array | None = None  # int32 [batch, cache_length]: every token so far (uncached)


def _decode_body(graphdef, sampling, eos_id: tuple[int, ...], carry):
    """One token per row. Cached: feed the last token. Uncached: rerun the whole buffer."""
    s, params = carry
    if s.cache is not None:
        model = nnx.merge(graphdef, params, s.cache)
        logits = model(s.last[:, None], s.pos[:, None], mode="decode")[:, 0]
        s = dataclasses.replace(s, cache=nnx.state(model, nnx.Cache))
    else:
        buffer = s.buffer.at[jnp.arange(s.last.shape[0]), s.pos].set(s.last)
        positions = jnp.broadcast_to(jnp.arange(buffer.shape[1]), buffer.shape)
        logits = _logits_at(nnx.merge(graphdef, params)(buffer, positions), s.pos)
        s = dataclasses.replace(s, buffer=buffer)
    nxt = _pick(logits, s.seen, s.key, s.step, sampling)
    nxt = jnp.where(s.done, eos_id[0] if eos_id else 0, nxt)
    done = s.done | jnp.isin(nxt, jnp.asarray(eos_id)) if eos_id else s.done
    s = dataclasses.replace(
        s, last=nxt, pos=s.pos + 1, step=s.step + 1, done=done, out=s.out.at[:, s.step].set(nxt),
        seen=_mark_seen(s.seen, nxt),
    )  # fmt: skip
    return s, params


def _cache_window(cache, window: int):
    """Cache arrays [..., kv_heads, cache_length, head_dim] cut to their first `window` slots."""
    return jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, window, axis=x.ndim + CACHE_LENGTH_AXIS), cache)


def _decode_chunk(graphdef, params, s: DecodeState, until, *, sampling, eos_id, window=None) -> DecodeState:
    """Decode until step == until or every row is done, all on the device.

    window (static): the loop carries and attends over cache[:, :window] only; the caller keeps
    every position written in this chunk below it. The window goes back into the full cache once,
    in place (the cache is donated), after the loop.
    """

    def cond(carry):
        return (carry[0].step < until) & ~jnp.all(carry[0].done)

    full = s.cache if window is not None else None
    if full is not None:
        s = dataclasses.replace(s, cache=_cache_window(full, window))
    # The parameters ride in the loop carry: NNX refuses Variables closed over from an outer trace.
    body = functools.partial(_decode_body, graphdef, sampling, eos_id)
    s, _ = jax.lax.while_loop(cond, body, (s, params))
    if full is not None:
        put_back = lambda f, w: jax.lax.dynamic_update_slice_in_dim(f, w, 0, axis=f.ndim + CACHE_LENGTH_AXIS)  # noqa: E731
        s = dataclasses.replace(s, cache=jax.tree.map(put_back, full, s.cache))
    return s


@functools.cache
def _compiled_decode_chunk(backend: str):
    """_decode_chunk jitted for `backend`. On CPU with XLA's region-analysis copy insertion: each
    step reads every layer's cache and then writes one slot of it in place, and the default
    analysis copied the cache twice per layer per step to be safe (ms/step grew with the window;
    docs/benchmarks.md). The option is XLA:CPU's own and is given to CPU compilations only."""
    options = {"xla_cpu_copy_insertion_use_region_analysis": True} if backend == "cpu" else None
    return jax.jit(
        _decode_chunk,
        static_argnames=("graphdef", "sampling", "eos_id", "window"),
        donate_argnames=("s",),
        compiler_options=options,
    )


def check_lengths(prompt_lengths: Sequence[int], max_new_tokens: int, max_seq_len: int) -> None:
    if not prompt_lengths or min(prompt_lengths) == 0:
        raise UserError("empty prompt: give at least one token of text (an empty string encodes to nothing)")
    if max_new_tokens <= 0:
        raise UserError(f"max new tokens ({max_new_tokens}) must be positive")
    longest = max(prompt_lengths)
    if longest + max_new_tokens > max_seq_len:
        raise UserError(
            f"prompt ({longest} tokens) + new tokens ({max_new_tokens}) = {longest + max_new_tokens} exceeds "
            f"the model's context of {max_seq_len} tokens; shorten the prompt or generate fewer tokens"
        )


def _prefill_state(graphdef, params, prompts, cache_len, max_new_tokens, *, vocab_size, sampling, key, eos_id,
                   use_cache, cache_dtype, prefill_chunk=0) -> tuple[nnx.GraphDef, DecodeState]:  # fmt: skip
    """Every prompt through the model, right-padded (filling a fresh KV cache, at once or prefill_chunk
    positions at a time; or the uncached loop's token buffer), and each row's first token sampled:
    where the decode loop starts."""
    batch, lengths = len(prompts), jnp.asarray([len(p) for p in prompts], jnp.int32)
    split = context_size()  # devices that share a sequence (mesh.context): the prompt splits evenly over them
    width = min(-(-bucket(max(len(p) for p in prompts)) // split) * split, cache_len)
    chunk = prefill_chunk if use_cache and prefill_chunk < width else 0
    tokens = np.zeros((batch, width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    seen = jnp.zeros((batch, vocab_size), bool)
    if sampling.repetition_penalty != 1.0:
        seen = seen.at[jnp.arange(batch)[:, None], tokens].set(tokens != 0)
    cache = buffer = None
    if use_cache:
        clone = nnx.merge(graphdef, params)
        clone.init_cache(batch, cache_len, cache_dtype)
        graphdef, _, cache = nnx.split(clone, nnx.Not(nnx.Cache), nnx.Cache)
        cache = place(cache)  # under a mesh: kv heads split like the parameters
        args = (graphdef, params, cache, jnp.asarray(tokens), lengths, key, seen)
        if chunk:
            cache, first = _prefill_chunked(*args, sampling=sampling, chunk=chunk)
        else:
            cache, first = _prefill(*args, sampling=sampling)
    else:
        buffer = jnp.zeros((batch, cache_len), jnp.int32).at[:, :width].set(tokens)
        first = _full_first(graphdef, params, buffer, lengths, key, seen, sampling=sampling)
    state = DecodeState(
        last=first, pos=lengths, step=jnp.int32(1), key=key,
        done=jnp.isin(first, jnp.asarray(eos_id)) if eos_id else jnp.zeros(batch, bool),
        out=jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first), seen=_mark_seen(seen, first),
        cache=cache, buffer=buffer,
    )  # fmt: skip
    return graphdef, state


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    batch_index: int = 0,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    cache_dtype=None,
    chunk: int | None = None,
    on_tokens: Callable[[np.ndarray], np.ndarray | None] | None = None,
    min_window: int = 64,
) -> Generation:
    """Generate up to max_new_tokens for each prompt (lists of token ids).

    on_tokens, if given, is called after each chunk of `chunk` steps with the new tokens
    [batch, n] (for streaming and stop strings); it may return a bool [batch] of rows to stop.
    The model is not modified: the cache lives on a copy. eos_id may list several stop ids (Llama 3's
    generation_config does); a row ends at the first of any. min_window: the smallest attention window
    of the cached loop (windows double from there; each is one compilation). The sampling key is
    key(seed) with batch_index folded in: the same prompt in two batches of one run gets its own sample.
    """
    cfg = model.cfg
    eos_id = (eos_id,) if isinstance(eos_id, int) else tuple(int(i) for i in eos_id or ())
    lengths = [len(p) for p in prompts]
    check_lengths(lengths, max_new_tokens, cfg.max_seq_len)
    cache_len = min(bucket(max(lengths) + max_new_tokens), cfg.max_seq_len)
    if use_cache and (cfg.scan_layers or cfg.tie_embeddings) and platform() == "cpu" and not adapters(model):
        # XLA:CPU copies a dynamic slice of the weight stack before each matmul (seen in its HLO),
        # and reads a tied head (the embedding transposed) slower than a [d_model, vocab] copy.
        # Accelerators are left alone: there a second copy of the parameters costs scarce memory,
        # and their compilers can fuse the slice into the matmul (not checked here). A LoRA model
        # (adapters, a quantised base) decodes as it is: the twin is rebuilt from the plain config.
        model = decode_twin(model)
    graphdef, params = nnx.split(model, nnx.Not(nnx.Cache))  # Params, and a QLoRA base's quantised weights
    key = jax.random.fold_in(jax.random.key(seed), batch_index)
    start = time.perf_counter()
    graphdef, state = _prefill_state(
        graphdef, params, prompts, cache_len, max_new_tokens, vocab_size=cfg.vocab_size, sampling=sampling, key=key,
        eos_id=eos_id, use_cache=use_cache, cache_dtype=cache_dtype or cfg.compute_dtype,
        prefill_chunk=cfg.prefill_chunk,
    )  # fmt: skip
    first = jax.block_until_ready(state.last)
    prefill_s = time.perf_counter() - start

    def emit(new):
        nonlocal state
        stop = on_tokens(new) if on_tokens else None
        if stop is not None:
            state = dataclasses.replace(state, done=state.done | jnp.asarray(stop))

    emit(to_host(first)[:, None])

    start, emitted, windows = time.perf_counter(), 1, []
    step = chunk or max_new_tokens
    longest = max(lengths)
    while emitted < max_new_tokens and not to_host(state.done).all():
        until = min(emitted + step, max_new_tokens)
        window = None
        if use_cache:
            # Step s writes position lengths + s - 1: this chunk's first step needs longest + emitted
            # slots, and the chunk stops before a row would write past the window.
            window = min(window_bucket(longest + emitted, min_window), cache_len)
            if window < cache_len:
                until = min(until, window - longest + 1)
            windows.append(window)
        state = _compiled_decode_chunk(platform())(
            graphdef, params, state, jnp.int32(until), sampling=sampling, eos_id=eos_id, window=window
        )
        reached = int(to_host(state.step))
        emit(to_host(state.out)[:, emitted:reached])
        emitted = reached
    out = to_host(jax.block_until_ready(state.out))
    decode_s = time.perf_counter() - start

    rows = [row.tolist() for row in out[:, :emitted]]
    ends = [next((n + 1 for n, t in enumerate(row) if t in eos_id), len(row)) for row in rows]  # through EOS
    return Generation([row[:end] for row, end in zip(rows, ends)], prefill_s, decode_s, sum(lengths), emitted - 1,
                      tuple(windows))  # fmt: skip


@dataclasses.dataclass
class Completion:
    prompt: str
    completion: str
    tokens: list[int]


def complete(
    model: nnx.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    batch_index: int = 0,
    stop: Sequence[str] = (),
    use_cache: bool = True,
    stream: Callable[[str], None] | None = None,
    chunk: int = 16,
    add_bos: bool | None = None,
) -> tuple[list[Completion], Generation]:
    """Text in, text out. Rows end at EOS (any of the tokenizer's stop ids) or at the first stop string
    (which is cut off).

    `stream`, for a single prompt, receives each new piece of text as soon as its chunk is done.
    add_bos is passed to the tokenizer's encode (None: its own rule; False for chat-templated prompts).
    """
    ids = [tokenizer.encode(p) if add_bos is None else tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    stop_ids = tuple(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))
    produced: list[list[int]] = [[] for _ in prompts]
    shown = [0]
    # Decoded after its prompt, a completion keeps the space that sentencepiece's "▁" prefix stands for.
    prompt_text = [tokenizer.decode(p) for p in ids]

    def text_of(row: list[int], n: int = 0) -> str:
        new = [t for t in row if t not in stop_ids]
        whole = tokenizer.decode(ids[n] + new)
        return whole[len(prompt_text[n]) :] if whole.startswith(prompt_text[n]) else tokenizer.decode(new)

    def cut(text: str) -> tuple[str, bool]:
        hits = [text.index(s) for s in stop if s in text]
        return (text[: min(hits)], True) if hits else (text, False)

    def on_tokens(new: np.ndarray):
        for row, toks in zip(produced, new.tolist()):
            row.extend(toks)
        stopped = [cut(text_of(row, n))[1] for n, row in enumerate(produced)]
        if stream is not None:
            text, _ = cut(text_of(produced[0]))
            # Hold back a tail that could still grow into a stop string.
            safe = len(text) if stopped[0] else max(shown[0], len(text) - max((len(s) for s in stop), default=0))
            while safe > shown[0] and text[safe - 1] == "\ufffd":  # a UTF-8 character still arriving byte by byte
                safe -= 1
            stream(text[shown[0] : safe])
            shown[0] = safe
        return np.array(stopped) if stop else None

    gen = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        batch_index=batch_index,
        eos_id=stop_ids,
        use_cache=use_cache,
        chunk=chunk if (stream or stop) else None,
        on_tokens=on_tokens if (stream or stop) else None,
    )
    out = []
    for n, (prompt, row) in enumerate(zip(prompts, gen.tokens)):
        text, _ = cut(text_of(row, n))
        out.append(Completion(prompt, text, row))
    if stream is not None:
        stream(out[0].completion[shown[0] :])
    return out, gen
