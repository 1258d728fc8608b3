"""The on-disk token format: one flat `.bin` of ids (doc, EOS, doc, EOS, ...) plus a small index.

`{name}.bin` holds the ids (uint16 when the vocabulary fits, else uint32), `{name}.idx.npy` the int64
start offset of every document, and `{name}.json` the counts. The `.json` is written last, so a file
set without it is an interrupted write, never mistaken for a complete one.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lm.data.tokenizer import Tokenizer
from lm.errors import UserError

FORMAT = "nnx-lm-tokens-v1"
_CHUNK_CHARS = 1 << 20  # documents are sent to workers in ~1 MB chunks
_IN_FLIGHT_PER_WORKER = 4  # bounds memory: at most this many chunks queued per worker

_worker_tokenizer: Tokenizer | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode_chunk(docs: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids of every doc followed by EOS, per-doc lengths, utf-8 bytes read)."""
    tok = tokenizer or _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    encoded = [tok.encode(doc) + [tok.eos_id] for doc in docs]
    ids = np.fromiter((i for doc in encoded for i in doc), dtype=dtype, count=sum(map(len, encoded)))
    lengths = np.array([len(doc) for doc in encoded], dtype=np.int64)
    return ids, lengths, sum(len(doc.encode("utf-8")) for doc in docs)


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in documents:
        if not doc:  # an empty document would be a lone EOS: nothing to learn from
            continue
        chunk.append(doc)
        size += len(doc)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ordered_map(fn: Callable, items: Iterable, workers: int, init: Callable, init_arg: str) -> Iterator:
    """Pool.imap with bounded look-ahead: Pool.imap itself reads its whole input ahead, unbounded."""
    # spawn, not fork: the caller may be a training process with JAX threads running.
    with multiprocessing.get_context("spawn").Pool(workers, init, (init_arg,)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_tokens(
    documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | os.PathLike, name: str, workers: int = 2
) -> TokenFile:
    """Encode `documents` on `workers` processes, in order, appending to `{out_dir}/{name}.bin` as it goes.

    Workers are spawned, so a script calling this with workers > 1 needs `if __name__ == '__main__':`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / name
    final = [_path(base, ext) for ext in (".bin", ".idx.npy", ".json")]
    tmp = [p.with_name(p.name + ".tmp") for p in final]
    final[2].unlink(missing_ok=True)  # the old index would vouch for a half-rewritten .bin
    chunks = _chunks(documents)
    head = list(itertools.islice(chunks, 2))
    chunks = itertools.chain(head, chunks)
    if workers > 1 and len(head) > 1:  # starting processes only pays off beyond one chunk
        results = _ordered_map(_encode_chunk, chunks, workers, _init_worker, str(tokenizer.path))
    else:
        results = (_encode_chunk(chunk, tokenizer) for chunk in chunks)
    lengths = array("q")
    n_tokens = n_bytes = 0
    try:
        with open(tmp[0], "wb") as f, tqdm(desc=f"encode {name}", unit="B", unit_scale=True, disable=None) as bar:
            for ids, doc_lengths, chunk_bytes in results:
                ids.tofile(f)
                lengths.extend(doc_lengths.tolist())
                n_tokens += len(ids)
                n_bytes += chunk_bytes
                bar.update(chunk_bytes)
        if n_tokens == 0:
            raise UserError(f"corpus {name!r} is empty (no non-empty documents); check --input and --text-field")
        doc_lengths = np.frombuffer(lengths, dtype=np.int64)
        doc_starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
        with open(tmp[1], "wb") as f:
            np.save(f, doc_starts)
        index = {
            "format": FORMAT,
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "n_tokens": n_tokens,
            "n_docs": len(doc_starts),
            "n_bytes": n_bytes,
        }
        tmp[2].write_text(json.dumps(index, indent=1) + "\n")
        for t, dest in zip(tmp, final):  # the .json goes last
            os.replace(t, dest)
    finally:
        results.close()  # stops the pool now, even when we leave early
        for t in tmp:
            t.unlink(missing_ok=True)
    return TokenFile(base)


def write_examples(examples: Iterable, tokenizer: Tokenizer, out_dir: str | os.PathLike, name: str) -> TokenFile:
    """Write pre-encoded examples (lm.data.instruct.Example: ids ending in EOS, and a loss mask) as a
    token file plus `{name}.mask.bin`, one uint8 per token: 1 where that token is a training target."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / name
    final = [_path(base, ext) for ext in (".bin", ".mask.bin", ".idx.npy", ".json")]
    tmp = [p.with_name(p.name + ".tmp") for p in final]
    final[3].unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    lengths = array("q")
    try:
        with open(tmp[0], "wb") as ids_out, open(tmp[1], "wb") as mask_out:
            for example in examples:
                np.asarray(example.ids, dtype=dtype).tofile(ids_out)
                np.asarray(example.mask, dtype=np.uint8).tofile(mask_out)
                lengths.append(len(example.ids))
        if not lengths:
            raise UserError(f"corpus {name!r} holds no examples; check --input")
        doc_lengths = np.frombuffer(lengths, dtype=np.int64)
        with open(tmp[2], "wb") as f:
            np.save(f, np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64))
        index = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "n_tokens": int(doc_lengths.sum()),
            "n_docs": len(doc_lengths),
            "n_bytes": 0,
            "masked": True,
        }
        tmp[3].write_text(json.dumps(index, indent=1) + "\n")
        for t, dest in zip(tmp, final):  # the .json goes last
            os.replace(t, dest)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return TokenFile(base)


def _path(base: Path, ext: str) -> Path:
    return base.with_name(base.name + ext)


class TokenFile:
    """A written token file, memory-mapped: reading any window costs only the pages it touches."""

    def __init__(self, path: str | os.PathLike):
        base = Path(path)
        for ext in (".json", ".bin", ".idx.npy"):
            if base.name.endswith(ext):
                base = base.with_name(base.name[: -len(ext)])
        self.path = base
        index_path = _path(base, ".json")
        if not index_path.is_file():
            raise UserError(f"token file {index_path} does not exist; run `python -m launch.prepare --out DIR` first")
        index = json.loads(index_path.read_text())
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.n_docs: int = index["n_docs"]
        self.n_bytes: int = index["n_bytes"]
        self.n_tokens: int = index["n_tokens"]
        bin_path = _path(base, ".bin")
        if not bin_path.is_file() or bin_path.stat().st_size != self.n_tokens * self.dtype.itemsize:
            raise UserError(f"{bin_path} is missing or the wrong size for {index_path}; run prepare again")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        self.doc_starts: np.ndarray = np.load(_path(base, ".idx.npy"))
        # Instruction/chat data (lm.data.instruct): 1 where a token is a training target, else None.
        self.mask = None
        if index.get("masked"):
            self.mask = np.memmap(_path(base, ".mask.bin"), dtype=np.uint8, mode="r", shape=(self.n_tokens,))

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, n_tokens={self.n_tokens}, n_docs={self.n_docs})"
