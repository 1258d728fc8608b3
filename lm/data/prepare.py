"""Raw text -> tokenizer.model + train/eval token files + meta.json, reused when nothing changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lm.data.corpus import (
    check_eval_fraction,
    document_keys,
    expand_inputs,
    file_keys,
    hash_score,
    held_out_mask,
    is_jsonl,
    iter_documents,
    split_files,
    stdlib_files,
)
from lm.data.instruct import FORMATS, Stats, encode_records, first_record_format, iter_records
from lm.data.tokenizer import Tokenizer, file_sha256, load_tokenizer, train_tokenizer
from lm.data.tokens import write_examples, write_tokens
from lm.errors import UserError

FORMAT = 1
STDLIB = "stdlib"


def _fingerprint(files: list[Path]) -> str:
    """Changes when any input file is added, removed, resized or touched: the cache key for the text."""
    digest = hashlib.sha256()
    for f, key in zip(files, file_keys(files)):
        st = f.stat()
        digest.update(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _splitter(files: list[Path], text_field: str, eval_fraction: float, seed: int):
    """(train documents, eval documents, what was split): each side a function returning a fresh stream.

    Plain files are held out whole; as soon as any input is `.jsonl`, the split is per document
    (hash of file and line number), so even one big jsonl file yields an eval set.
    """
    if not any(is_jsonl(f) for f in files):
        _need_two(len(files), "files")
        train, held = split_files(files, eval_fraction, seed)
        n_files = {"train": len(train), "eval": len(held)}
        return (lambda: iter_documents(train)), (lambda: iter_documents(held)), n_files
    scores = np.fromiter((hash_score(k, seed) for k in document_keys(files)), dtype=np.float64)
    _need_two(len(scores), "documents")
    is_eval = held_out_mask(scores, eval_fraction)

    def side(want_eval: bool) -> Callable[[], Iterator[str]]:
        def docs() -> Iterator[str]:
            for doc, held_out in zip(iter_documents(files, text_field), is_eval):
                if held_out == want_eval:
                    yield doc

        return docs

    return side(False), side(True), {"train": None, "eval": None}


def _need_two(n: int, what: str) -> None:
    if n < 2:
        raise UserError(f"the input has {n} {what}; holding some out for eval needs at least 2, so add more --input")


def prepare_corpus(
    inputs: list[str] | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    vocab_size: int = 8192,
    text_field: str = "text",
    eval_fraction: float = 0.02,
    seed: int = 0,
    workers: int = 2,
    format: str = "auto",
    seq_len: int | None = None,
    overwrite: bool = True,
) -> dict:
    """Prepare `out_dir` for training; `inputs=None`, or 'stdlib' among them, means the stdlib `.py` files.

    JSONL with `prompt`/`completion` or chat `messages` (format auto, completion or chat) becomes
    token files with a loss mask (lm.data.instruct); examples are truncated to `seq_len`.
    overwrite=False refuses to replace anything already in `out_dir` (unless it is reused as it is);
    a run directory is never prepared into (see _check_replace)."""
    started = time.perf_counter()
    check_eval_fraction(eval_fraction)
    inputs = [str(i) for i in inputs or [STDLIB]]
    patterns = [i for i in inputs if i != STDLIB]
    files = (stdlib_files() if STDLIB in inputs else []) + (expand_inputs(patterns) if patterns else [])
    if not files:
        raise UserError("found no standard library .py files; pass --input PATH_OR_GLOB instead")
    # A Hugging Face tokenizer (a folder) always takes the record path: it encodes JSONL records.
    if _instruct_format(files, format) or (tokenizer_path and Path(tokenizer_path).is_dir()):
        return _prepare_instruct(
            files, inputs, Path(out_dir), tokenizer_path, format, seq_len, eval_fraction, seed, overwrite
        )
    args = {
        "format": FORMAT,
        "inputs": inputs,
        "n_files": len(files),
        "fingerprint": _fingerprint(files),
        "tokenizer": file_sha256(Tokenizer(tokenizer_path).path) if tokenizer_path else None,
        "vocab_size": None if tokenizer_path else vocab_size,
        "text_field": text_field,
        "eval_fraction": eval_fraction,
        "seed": seed,
    }
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    if cached := _reusable(meta_path, args):
        return {**cached, "cached": True}
    _check_replace(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # from here until the end the directory is not a finished one
    train_docs, eval_docs, files_per_split = _splitter(files, text_field, eval_fraction, seed)
    tokenizer_out = out_dir / "tokenizer.model"
    t0 = time.perf_counter()
    if tokenizer_path:
        tmp = tokenizer_out.with_name(tokenizer_out.name + ".tmp")
        shutil.copyfile(tokenizer_path, tmp)
        os.replace(tmp, tokenizer_out)
        tokenizer = Tokenizer(tokenizer_out)
    else:
        tokenizer = train_tokenizer(train_docs(), vocab_size, tokenizer_out, seed=seed)
    t1 = time.perf_counter()
    train = write_tokens(train_docs(), tokenizer, out_dir, "train", workers)
    held = write_tokens(eval_docs(), tokenizer, out_dir, "eval", workers)
    t2 = time.perf_counter()
    meta = {
        "args": args,
        "sources": inputs,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": file_sha256(tokenizer_out),
        "seed": seed,
        "eval_fraction": eval_fraction,
        "splits": {
            name: {
                "n_files": files_per_split[name],
                "n_docs": tf.n_docs,
                "n_tokens": tf.n_tokens,
                "n_bytes": tf.n_bytes,
            }
            for name, tf in (("train", train), ("eval", held))
        },
        "seconds": {"tokenizer": round(t1 - t0, 2), "encode": round(t2 - t1, 2), "total": round(t2 - started, 2)},
    }
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)
    return {**meta, "cached": False}


def _instruct_format(files: list[Path], format: str) -> bool:
    """Whether the inputs are instruction/chat records (then every input must be JSONL)."""
    if format not in FORMATS:
        raise UserError(f"data.format={format!r} is not one of {list(FORMATS)}")
    if format == "text" or not any(is_jsonl(f) for f in files):
        if format in ("completion", "chat"):
            raise UserError(f"data.format={format} needs .jsonl inputs with one record per line")
        return False
    if format == "auto" and all(first_record_format(f) in ("text", None) for f in files if is_jsonl(f)):
        return False
    plain = [f for f in files if not is_jsonl(f)]
    if plain:
        raise UserError(f"instruction/chat data must be .jsonl only, but the inputs include {plain[0]}")
    return True


def _check_replace(out_dir: Path, overwrite: bool) -> None:
    """Never prepare into a run directory (its tokenizer.model is the one its checkpoints were trained
    with), and replace other earlier contents only when asked to."""
    if (out_dir / "recipe.json").is_file():
        raise UserError(
            f"{out_dir} is a run directory (it holds recipe.json): preparing data there would replace the run's "
            "tokenizer.model; choose another output folder"
        )
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(
            f"{out_dir} already holds files (data prepared with other arguments, or not prepared data); "
            "pass --overwrite to replace them, or choose a new folder"
        )


def _prepare_instruct(
    files, inputs, out_dir: Path, tokenizer_path, format, seq_len, eval_fraction, seed, overwrite=True
) -> dict:
    """Instruction/chat records -> train/eval token files with masks, split per record by hash."""
    started = time.perf_counter()
    plain = [f for f in files if not is_jsonl(f)]
    if plain:
        raise UserError(
            f"with a Hugging Face tokenizer or instruction/chat data the inputs must be .jsonl (one record per "
            f"line: text, prompt/completion or messages), but they include {plain[0]}"
        )
    if tokenizer_path is None:
        raise UserError(
            "instruction/chat data needs the model's tokenizer: set init.from (its tokenizer is used) or data.tokenizer"
        )
    if not seq_len:
        raise UserError("instruction/chat data needs train.seq_len to truncate examples to")
    tokenizer = load_tokenizer(tokenizer_path)
    args = {
        "format": FORMAT,
        "data_format": format,
        "inputs": inputs,
        "fingerprint": _fingerprint(files),
        "tokenizer": tokenizer.sha256,
        "eval_fraction": eval_fraction,
        "seq_len": seq_len,
        "seed": seed,
    }
    meta_path = out_dir / "meta.json"
    if (cached := _reusable(meta_path, args, masked=True)) is not None:
        return {**cached, "cached": True}
    _check_replace(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    scores = np.fromiter((hash_score(k, seed) for k in document_keys(files)), dtype=np.float64)
    _need_two(len(scores), "records")
    is_eval = held_out_mask(scores, eval_fraction)
    stats = {}
    for name, want in (("train", False), ("eval", True)):
        records = (r for r, held in zip(iter_records(files), is_eval) if held == want)
        stats[name] = Stats()
        write_examples(encode_records(records, format, tokenizer, seq_len, stats[name]), tokenizer, out_dir, name)
    meta = {
        "args": args,
        "sources": inputs,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "splits": {
            name: {
                "n_examples": st.examples,
                "truncated": st.truncated,
                "trained_tokens": st.trained_tokens,
                "formats": st.formats,
            }
            for name, st in stats.items()
        },
        "seconds": {"total": round(time.perf_counter() - started, 2)},
    }
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)
    return {**meta, "cached": False}


def _reusable(meta_path: Path, args: dict, masked: bool = False) -> dict | None:
    """The existing meta if it was made from the same arguments and all its files are there."""
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    out = meta_path.parent
    exts = (".bin", ".idx.npy", ".json") + ((".mask.bin",) if masked else ())
    needed = ([] if masked else ["tokenizer.model"]) + [f"{s}{ext}" for s in ("train", "eval") for ext in exts]
    if meta.get("args") != args or not all((out / n).is_file() for n in needed):
        return None
    return meta
