"""Scoring held-out text or token ids: negative log-likelihood, perplexity, bits per byte, raw logits.

How a document is scored: it is encoded with the tokenizer's own rule and every one of its tokens is
predicted from what precedes it. The first token is predicted from a context token: the BOS where the
tokenizer adds one (Llama, Gemma), else the EOS (GPT-2, Qwen and our own models: documents are joined
by EOS in training, so this is their document boundary, as in lm-eval's rolling log-likelihood).
A document longer than the window W (default min(context, 4096)) is scored in windows of W tokens that
start every `stride` tokens (default W/2); each window scores only the tokens no earlier window
scored, so every token is scored once, with at least W - stride tokens of context after the first
window. The loss runs over a window in chunks of positions (lm.loss.chunked_cross_entropy_sum), so
float32 logits never exist for a whole window.

Under a mesh whose `length` rule splits sequences (mesh.context, launch.score --context), every row is
split over those devices: rows are padded to a multiple of them (twice that where the window allows,
so that the zig-zag order of lm.kernels.context balances the causal work), and attention runs by
context parallelism. The numbers are those of one device.
"""

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.data.instruct import Stats, encode_records
from lm.errors import UserError
from lm.infer.decode import bucket
from lm.kernels.context import balanced, context_size
from lm.loss import chunked_cross_entropy_sum
from sharding.partition import to_host

DEFAULT_WINDOW = 4096
LOGITS_PER_CHUNK = 1 << 22  # float32 logits per row of a loss chunk: 16 MiB


@dataclasses.dataclass(frozen=True)
class Score:
    tokens: int  # predicted tokens
    nll_sum: float  # nats, summed over those tokens
    documents: int
    bytes: int | None = None  # UTF-8 bytes of the scored text (None for token ids)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else None

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
            **({"bytes": self.bytes, "bits_per_byte": self.bits_per_byte} if self.bytes is not None else {}),
        }


def check_context(length: int) -> None:
    """Rows of up to `length` tokens must split evenly over the devices that share a sequence."""
    n = context_size()
    if length % n:
        raise UserError(
            f"--context={n} does not divide the scoring window of {length} tokens; pass a --context that divides it "
            "(or a --window it divides)"
        )


def row_width(longest: int, limit: int) -> int:
    """The padded width of rows of up to `longest` tokens: a power of two (few shapes compile), at most
    `limit`, and a multiple of the devices that share a sequence (2x that where `limit` allows: zig-zag)."""
    n = context_size()
    step = 2 * n if limit % (2 * n) == 0 else n
    return -(-min(bucket(longest), limit) // step) * step


def check_window(window: int | None, stride: int | None, context: int) -> tuple[int, int]:
    """(window, stride) with their defaults: min(context, 4096) and half the window."""
    window = min(context, DEFAULT_WINDOW) if window is None else window
    if not 2 <= window <= context:
        raise UserError(f"--window={window} must be in [2, {context}] (the model's context is {context})")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride < window:  # windows overlap by a token at least: a target needs the position before it
        raise UserError(f"--stride={stride} must be in [1, {window - 1}] for --window={window}")
    return window, stride


def windows(n: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, first_target) for a sequence of n tokens: ids[start:end] scores the targets
    first_target..end-1 (target t is predicted by position t-1). Windows start every `stride` tokens
    (default window // 2)."""
    stride = max(1, window // 2) if stride is None else stride
    out, start, done = [], 0, 0  # done: targets below this index are scored
    while True:
        end = min(start + window, n)
        out.append((start, end, max(done, start + 1)))
        if end == n:
            return out
        done, start = end, start + stride


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return nnx.merge(graphdef, params)(tokens, positions)


def loss_chunk(cfg, length: int) -> int:
    """Positions per loss chunk: the model's own setting, else at most LOGITS_PER_CHUNK logits a row."""
    return cfg.loss_chunk_for(length) or min(length, max(1, LOGITS_PER_CHUNK // cfg.vocab_size))


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _nll(graphdef, params, tokens, weights, chunk: int):
    """Summed NLL of tokens[:, 1:] given the prefix, weighted by weights[:, 1:], `chunk` positions'
    logits at a time."""
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    # Position t predicts token t + 1 (the last predicts nothing): paired before the zig-zag reorder
    # (where mesh.context splits the sequence), which moves each target and weight with its position.
    targets, weights = jnp.roll(tokens, -1, axis=1), jnp.roll(weights, -1, axis=1).at[:, -1].set(0.0)
    with balanced({"tokens": tokens, "positions": positions, "targets": targets, "weights": weights}) as row:
        hidden = model(row["tokens"], row["positions"], return_hidden=True)
    return chunked_cross_entropy_sum(
        hidden, model.head(), row["targets"], row["weights"], chunk, model.cfg.final_softcap
    )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_logprobs(graphdef, params, inputs, targets, weights):
    """Per row: the summed log-probability of `targets` (each predicted from `inputs` up to its
    position) where weights is 1, and whether each of those is the argmax (greedy) choice.
    inputs, targets, weights [batch, length] -> [batch], [batch]."""
    logits = _logits(graphdef, params, inputs).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | (weights == 0), axis=-1)
    return jnp.sum(logp * weights, axis=-1), greedy


def score_continuations(
    model, items: Sequence[tuple[Sequence[int], int]], *, batch_size: int = 8, row_multiple: int = 1
) -> list[tuple[float, bool]]:
    """(log-probability, greedy) of each item's last `n` tokens given the tokens before them, for items
    (ids, n) of at most the model's context + 1 tokens: lm-eval's loglikelihood of a continuation.

    Items are run longest first in batches of similar length (padded to a power of two, so few
    shapes compile), batch_size rows each, rounded up to a multiple of row_multiple (the devices the
    batch is split over). Results come back in the items' order. Call under the model's mesh and rules.
    """
    check_context(model.cfg.max_seq_len)
    graphdef, params = nnx.split(model, nnx.Not(nnx.Cache))
    rows = -(-batch_size // row_multiple) * row_multiple
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    for start in range(0, len(order), rows):
        chunk = order[start : start + rows]
        width = row_width(max(len(items[i][0]) for i in chunk) - 1, model.cfg.max_seq_len)
        inputs, targets = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
        weights = np.zeros((rows, width), np.float32)
        for r, i in enumerate(chunk):
            ids, n = items[i]
            if not 0 < n < len(ids) <= model.cfg.max_seq_len + 1:
                raise ValueError(f"item {i}: {n} scored of {len(ids)} tokens (context {model.cfg.max_seq_len})")
            k = len(ids) - 1
            inputs[r, :k], targets[r, :k], weights[r, k - n : k] = ids[:-1], ids[1:], 1.0
        sums, greedy = map(to_host, _row_logprobs(graphdef, params, *map(jnp.asarray, (inputs, targets, weights))))
        for r, i in enumerate(chunk):
            out[i] = (float(sums[r]), bool(greedy[r]))
    return out


def _rows(rows: list[np.ndarray], weights: list[np.ndarray], context: int, batch_size: int):
    """Pad a batch to batch_size rows of row_width (few recompilations), padding weighted 0."""
    width = row_width(max(len(r) for r in rows), context)
    tokens = np.zeros((batch_size, width), np.int32)
    w = np.zeros((batch_size, width), np.float32)
    for i, (r, wr) in enumerate(zip(rows, weights)):
        tokens[i, : len(r)], w[i, : len(r)] = r, wr
    return jnp.asarray(tokens), jnp.asarray(w)


def _score_rows(
    model, items: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int, context: int | None = None
) -> tuple[float, int]:
    graphdef, params = nnx.split(model, nnx.Not(nnx.Cache))  # Params, and a QLoRA base's quantised weights
    context = context or model.cfg.max_seq_len
    check_context(context)
    total, count, batch = 0.0, 0, []

    def flush():
        nonlocal total, count
        tokens, w = _rows([r for r, _ in batch], [w for _, w in batch], context, batch_size)
        s, n = _nll(graphdef, params, tokens, w, loss_chunk(model.cfg, tokens.shape[1]))
        total, count = total + float(s), count + int(n)
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return total, count


def score_texts(
    model, tokenizer, texts: Iterable[str], *, batch_size: int = 8, window: int | None = None, stride: int | None = None
) -> Score:
    """Score documents (see the module docstring for the rule). Call under the model's mesh and rules."""
    context, stride = check_window(window, stride, model.cfg.max_seq_len)
    prefix = [] if tokenizer.add_bos else [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    stats = {"documents": 0, "bytes": 0}

    def items():
        for text in texts:
            ids = np.asarray(prefix + tokenizer.encode(text), np.int32)
            stats["documents"] += 1
            stats["bytes"] += len(text.encode("utf-8"))
            if ids.size > 1 and ids.max() >= model.cfg.vocab_size:
                raise UserError(
                    f"the tokenizer produced id {int(ids.max())} but the model has vocab_size={model.cfg.vocab_size}"
                )
            for start, end, first in windows(len(ids), context, stride) if len(ids) > 1 else []:
                w = np.zeros(end - start, np.float32)
                w[first - start :] = 1.0
                yield ids[start:end], w

    total, count = _score_rows(model, items(), batch_size, context)
    if count == 0:
        raise UserError("the input holds no text to score (every document is empty)")
    return Score(count, total, stats["documents"], stats["bytes"])


def score_examples(model, tokenizer, records, *, fmt: str = "auto", batch_size: int = 8) -> Score:
    """Score instruction or chat records ((where, record) pairs) on their trained tokens only: the
    completion and its EOS, or the assistant turns, as the fine-tuning eval does. An example longer
    than the context is truncated by lm.data.instruct's rule."""
    stats = Stats()

    def items():
        for ex in encode_records(records, fmt, tokenizer, model.cfg.max_seq_len, stats):
            yield np.asarray(ex.ids, np.int32), np.asarray(ex.mask, np.float32)

    total, count = _score_rows(model, items(), batch_size)
    if count == 0:
        raise UserError("the input holds no trained tokens to score (no completion or assistant turn)")
    return Score(count, total, stats.examples, None)


def check_token_ids(ids: np.ndarray, vocab_size: int, context: int, where: str) -> np.ndarray:
    """An int array [batch, length] (or [length]) of ids the model can embed, no longer than its context."""
    if not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{where} holds {ids.dtype} values; save an integer array of token ids [batch, length]")
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise UserError(f"{where} has shape {ids.shape}; save token ids as [batch, length] with length >= 2")
    if ids.shape[1] > context:
        raise UserError(
            f"{where} rows have {ids.shape[1]} tokens but the model's context is {context}; cut them to {context}"
        )
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise UserError(
            f"{where} holds token ids from {ids.min()} to {ids.max()} but the model has vocab_size={vocab_size}"
        )
    return ids.astype(np.int32)


def score_token_ids(model, ids: np.ndarray, *, batch_size: int = 8) -> Score:
    """Mean NLL of ids[:, 1:] given their prefixes, for an int array [batch, length] (no tokenizer)."""
    items = ((row, np.ones(len(row), np.float32)) for row in ids)
    total, count = _score_rows(model, items, batch_size)
    return Score(count, total, len(ids))


def logits_of(model, ids: np.ndarray, *, batch_size: int = 8) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 logits [rows, length, vocab]) for ids [batch, length], batch_size rows at a
    time, each block whole on this host (with several processes, every process must iterate)."""
    graphdef, params = nnx.split(model, nnx.Not(nnx.Cache))  # Params, and a QLoRA base's quantised weights
    length = ids.shape[1]
    pad = -length % context_size()  # split over the devices that share a sequence; causal: the pad changes nothing
    for i in range(0, len(ids), batch_size):
        block = jnp.asarray(np.pad(ids[i : i + batch_size], ((0, 0), (0, pad))))
        yield i, to_host(_logits(graphdef, params, block))[:, :length]
