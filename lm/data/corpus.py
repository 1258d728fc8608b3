"""Finding and reading raw text: the embedded stdlib corpus, user paths/globs, and the held-out split."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lm.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".py")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own `.py` files: a corpus every Python install carries, so no download."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages"} & set(rel.parts):
            continue
        if path.is_file() and os.access(path, os.R_OK):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def file_keys(files: list[Path]) -> list[str]:
    """Each file's path relative to the files' common folder: the same names on every machine."""
    if not files:
        return []
    root = os.path.commonpath([str(Path(f).resolve().parent) for f in files])
    return [Path(os.path.relpath(Path(f).resolve(), root)).as_posix() for f in files]


def hash_score(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (key, seed); a hash, not an RNG, so the split never drifts."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def held_out_mask(scores: np.ndarray, eval_fraction: float) -> np.ndarray:
    """True where the item is held out; with >= 2 items both sides are non-empty."""
    check_eval_fraction(eval_fraction)
    is_eval = scores < eval_fraction
    if len(scores) >= 2:
        if not is_eval.any():
            is_eval[np.argmin(scores)] = True
        if is_eval.all():
            is_eval[np.argmax(scores)] = False
    return is_eval


def check_eval_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"eval_fraction={eval_fraction} must be between 0 and 1; use e.g. --eval-fraction 0.02")


def split_files(files: list[Path], eval_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """(train, eval) by file, decided per file by a hash of its relative path and the seed."""
    files = list(files)
    scores = np.array([hash_score(key, seed) for key in file_keys(files)], dtype=np.float64)
    is_eval = held_out_mask(scores, eval_fraction)
    train = [f for f, e in zip(files, is_eval) if not e]
    held = [f for f, e in zip(files, is_eval) if e]
    return train, held


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Paths, folders (all text files under them) or globs (`**` recursive), in a deterministic order."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        exists = os.path.exists(expanded)
        matches = [expanded] if exists else sorted(glob.glob(expanded, recursive=True))
        files = []
        for match in matches:
            if os.path.isdir(match):
                files += sorted(
                    (p for p in Path(match).rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)),
                    key=lambda p: p.as_posix(),
                )
            elif os.path.isfile(match):
                files.append(Path(match))
        if not files:
            raise UserError(
                f'--input {pattern!r} matches no files; check the path, or quote a glob such as "data/**/*.jsonl"'
            )
        for f in files:
            found[f.resolve()] = None
    return list(found)


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for each non-blank line; one JSON document per line."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line
    except FileNotFoundError:
        raise UserError(f"input file {path} does not exist; check --input") from None
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}); check that the file is intact") from None


def document_keys(paths: Iterable[Path]) -> Iterator[str]:
    """A stable name per document, in iter_documents order, read without parsing JSON."""
    paths = [Path(p) for p in paths]
    for path, key in zip(paths, file_keys(paths)):
        if is_jsonl(path):
            for lineno, _ in jsonl_lines(path):
                yield f"{key}:{lineno}"
        else:
            yield key


def iter_documents(paths: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Stream documents: a plain file is one document, a `.jsonl[.gz]` line is one (its `text_field`)."""
    for path in map(Path, paths):
        if not is_jsonl(path):
            try:
                yield path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                raise UserError(f"input file {path} does not exist; check --input") from None
            continue
        for lineno, line in jsonl_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
                raise UserError(
                    f"{path}:{lineno} has no {text_field!r} field (found {keys}); "
                    f"pass --text-field with the key that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{lineno} field {text_field!r} is a {type(text).__name__}, not a string; "
                    f"pass --text-field with the key that holds the text"
                )
            yield text
