"""Packed fixed-length training batches from a token file, as a deterministic, resumable grain dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence

import grain
import numpy as np

from lm.data.tokens import TokenFile
from lm.errors import UserError


class PackedWindows:
    """Random-access windows of the concatenated token stream: example i is tokens[i*L : i*L + L + 1].

    Windows cross document boundaries (packing); `segment_ids` and `positions` tell attention and
    RoPE where each document starts, and `weights` drops the loss on the EOS -> next-document step.
    """

    def __init__(self, token_file: TokenFile, seq_len: int):
        self.path = token_file.path
        self.seq_len = seq_len
        self.n_tokens = len(token_file)
        self._file: TokenFile | None = token_file

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getstate__(self) -> dict:
        # A memmap does not pickle usefully: worker processes reopen the file instead.
        return {**self.__dict__, "_file": None}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        if self._file is None:
            self._file = TokenFile(self.path)
        length, start = self.seq_len, index * self.seq_len
        window = np.asarray(self._file.tokens[start : start + length + 1], dtype=np.int32)
        doc_starts = self._file.doc_starts
        offsets = np.arange(start, start + length + 1)
        doc = np.searchsorted(doc_starts, offsets, side="right") - 1  # document holding each offset
        return {
            "tokens": window[:-1],
            "targets": window[1:],
            "segment_ids": (doc[:-1] - doc[0] + 1).astype(np.int32),
            # A document already running at the window start counts from 0 there.
            "positions": (offsets[:-1] - np.maximum(doc_starts[doc[:-1]], start)).astype(np.int32),
            "weights": (doc[1:] == doc[:-1]).astype(np.float32),
        }


class PackedExamples:
    """Windows of whole examples (instruction/chat data): consecutive examples are packed greedily, in
    file order, into windows of seq_len tokens; the rest of a window is padding (segment 0, weight 0).

    Unlike PackedWindows no example is split across windows, so a completion always sees its prompt.
    The loss weights come from the token file's mask: weight t is 1 when token t + 1 is a training
    target of the same example.
    """

    def __init__(self, token_file: TokenFile, seq_len: int):
        self.path = token_file.path
        self.seq_len = seq_len
        self._file: TokenFile | None = token_file
        starts = token_file.doc_starts
        lengths = np.diff(np.append(starts, token_file.n_tokens))
        windows, first, used = [], 0, 0
        for doc, n in enumerate(lengths.tolist()):
            n = min(n, seq_len)  # an example longer than a window (data prepared for a longer seq_len) is cut
            if used + n > seq_len:
                windows.append((first, doc))
                first, used = doc, 0
            used += n
        windows.append((first, len(lengths)))
        self.windows = np.asarray(windows, dtype=np.int64)  # [n_windows, 2]: first and end document

    def __len__(self) -> int:
        return len(self.windows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        if self._file is None:
            self._file = TokenFile(self.path)
        f, length = self._file, self.seq_len
        starts = np.append(f.doc_starts, f.n_tokens)
        first, end = self.windows[index]
        pieces = [np.arange(starts[d], min(starts[d + 1], starts[d] + length)) for d in range(first, end)]
        offsets = np.concatenate(pieces)
        n = len(offsets)
        doc = np.repeat(np.arange(end - first), [len(p) for p in pieces])
        tokens = np.asarray(f.tokens[offsets], dtype=np.int32)
        mask = np.asarray(f.mask[offsets], dtype=np.float32)
        out = {k: np.zeros(length, np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        out["weights"] = np.zeros(length, np.float32)
        out["tokens"][:n] = tokens
        out["targets"][: n - 1] = tokens[1:]
        out["segment_ids"][:n] = doc + 1
        out["positions"][:n] = offsets - starts[first + doc]
        out["weights"][: n - 1] = mask[1:] * (doc[1:] == doc[:-1])
        return out


def make_dataset(
    token_file: TokenFile | str | os.PathLike,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    rows: Sequence[int] | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """Batches of the given `rows` of each global batch (default: all); arrays are [len(rows), seq_len].

    Global batch b is examples b*G .. b*G + G - 1 of the (shuffled) example sequence, whoever reads it:
    a process reads only the rows its devices hold (sharding.partition.process_rows), so processes
    that hold the same rows (a tensor group across processes) read the same examples, and the
    iterator's state (the step) means the same thing for any number of processes.
    The shuffle is re-drawn each epoch (grain seeds epoch e with seed + e). `num_epochs=None` repeats forever.
    """
    if seq_len < 1 or global_batch_size < 1:
        raise UserError(f"seq_len={seq_len} and batch size={global_batch_size} must be positive")
    rows = np.arange(global_batch_size) if rows is None else np.asarray(rows, dtype=np.int64)
    if not len(rows) or rows.min() < 0 or rows.max() >= global_batch_size:
        raise UserError(f"rows {rows.tolist()} are not a non-empty subset of the batch's {global_batch_size} rows")
    if not 0 <= seed < 2**32:
        raise UserError(f"seed={seed} must be in [0, 2**32); use e.g. train.seed=0")
    token_file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
    source = (PackedWindows if token_file.mask is None else PackedExamples)(token_file, seq_len)
    if len(source) < global_batch_size:
        needed = global_batch_size * seq_len + 1
        raise UserError(
            f"{token_file.path} has {len(token_file)} tokens but seq_len={seq_len} x batch={global_batch_size} "
            f"needs at least {needed}; use a smaller train.seq_len or train.batch_size, or more data"
        )
    examples = grain.MapDataset.source(source)
    if shuffle:
        examples = examples.shuffle(seed=seed)
    examples = examples.repeat(num_epochs)
    per_batch, steps = len(rows), len(examples) // global_batch_size  # a last partial batch is dropped
    ds = grain.MapDataset.range(steps * per_batch).map(
        lambda j: examples[(j // per_batch) * global_batch_size + int(rows[j % per_batch])]
    )
    ds = ds.batch(per_batch, drop_remainder=True)
    # One background thread overlaps batch assembly with the training step; more would fight for the GIL.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
