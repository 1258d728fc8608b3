"""A sentencepiece BPE tokenizer that round-trips source code exactly (whitespace, newlines, any unicode)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from lm.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# sentencepiece skips training sentences longer than max_sentence_length bytes; cut long lines below it.
_MAX_LINE_CHARS = 8192


class Tokenizer:
    """A loaded `.model` file. `encode` adds no BOS/EOS: callers decide where documents end."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(
                f"tokenizer {self.path} does not exist; pass a sentencepiece .model file "
                f"or run `python -m launch.prepare` to train one"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{self.path} is not a sentencepiece model ({e}); pass a .model file") from None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _training_lines(documents: Iterable[str], counter: list[int]) -> Iterator[str]:
    """Lines with their '\\n' kept, so the model learns newlines and indentation as they appear."""
    for doc in documents:
        for line in doc.splitlines(keepends=True):
            for start in range(0, len(line), _MAX_LINE_CHARS):
                counter[0] += 1
                yield line[start : start + _MAX_LINE_CHARS]


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, out_path: str | os.PathLike, *, seed: int = 0
) -> Tokenizer:
    """Train BPE on `documents` and write `out_path` (written whole, via a temporary name)."""
    out_path = Path(out_path)
    model = io.BytesIO()
    n_lines = [0]
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents, n_lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            # Identity normalization, kept whitespace and no dummy prefix make decode(encode(s)) == s.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            byte_fallback=True,  # any character, seen in training or not, encodes as bytes, never <unk>
            split_digits=True,
            character_coverage=0.9995,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            max_sentence_length=4 * _MAX_LINE_CHARS,
            input_sentence_size=2_000_000,  # a sample keeps training ~10 s however large the corpus
            shuffle_input_sentence=True,
            num_threads=max(1, min(os.cpu_count() or 1, 16)),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(str(e), vocab_size, n_lines[0]) from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)


def _training_error(message: str, vocab_size: int, n_lines: int) -> UserError:
    if n_lines == 0:
        return UserError("corpus for the tokenizer is empty; check --input and --text-field")
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
        return UserError(
            f"vocab_size={vocab_size} is too large for this corpus (it supports at most {m.group(2)}); "
            f"use a smaller --vocab-size or more text"
        )
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        return UserError(
            f"vocab_size={vocab_size} is too small: the bytes, special tokens and common characters "
            f"need {m.group(2)}; use --vocab-size {int(m.group(2)) + 64} or more"
        )
    return UserError(f"tokenizer training failed with vocab_size={vocab_size}: {message.splitlines()[0]}")
