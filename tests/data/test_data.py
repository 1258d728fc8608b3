"""Data layer: exact tokenizer round trips, the token file format, packing, and the grain pipeline."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import lm.data.tokens as tokens_module
from lm.data import (
    PackedWindows,
    TokenFile,
    Tokenizer,
    expand_inputs,
    iter_documents,
    make_dataset,
    prepare_corpus,
    split_files,
    stdlib_files,
    train_tokenizer,
    write_tokens,
)
from lm.data.corpus import stdlib_root
from lm.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TRICKY = 'def f(x):\n\tif x:\n\t\treturn  "ünï\tcödé 😀"  \r\n\n\n    # 12345 trailing   \n\x00\u2028end'


def synthetic_source(seed: int, n_lines: int = 120) -> str:
    """Python-looking text with indentation, tabs, blank lines, digits and non-ASCII, for fast tests."""
    rng = random.Random(seed)
    words = ["self", "value", "items", "result", "count", "name", "data", "größe", "naïve", "x"]
    lines = []
    for _ in range(n_lines):
        indent = rng.choice(["", "    ", "        ", "\t", "\t\t"])
        kind = rng.randrange(5)
        a, b = rng.choice(words), rng.choice(words)
        if kind == 0:
            lines.append(f"{indent}def {a}_{b}({a}, {b}={rng.randrange(1000)}):")
        elif kind == 1:
            lines.append(f"{indent}{a} = {b}[{rng.randrange(100)}] + {rng.random():.4f}")
        elif kind == 2:
            lines.append("")
        elif kind == 3:
            lines.append(f"{indent}return {a}.{b}()  # {b} → {a}")
        else:
            lines.append(f"{indent}if {a} is not None and {b}:   ")
    return "\n".join(lines) + "\n"


class CharTokenizer:
    """An independent stand-in tokenizer: one id per letter, so expected streams are easy to write."""

    path = None
    eos_id = 3
    vocab_size = 64

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") + 4 for c in text]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    docs = [synthetic_source(seed) for seed in range(30)]
    return train_tokenizer(docs, 400, tmp_path_factory.mktemp("tok") / "tok.model")


def char_token_file(tmp_path: Path, docs: list[str], name: str = "tiny") -> TokenFile:
    return write_tokens(docs, CharTokenizer(), tmp_path, name, workers=1)


def numbered_docs(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randrange(1, 40))) for _ in range(n_docs)]


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_tokenizer_round_trips_exactly(tmp_path):
    files = stdlib_files()
    sample = files[:: max(1, len(files) // 40)][:40]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sample]
    tok = train_tokenizer(texts, 512, tmp_path / "stdlib.model")
    assert tok.vocab_size == 512 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    unseen = [f.read_text(encoding="utf-8", errors="replace") for f in files[1::97][:10]]
    for text in texts + unseen + [TRICKY, "", " ", "\n\n", "  leading spaces"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.id_to_piece(tok.encode("\n")[0]) == "\n"
    assert Tokenizer(tmp_path / "stdlib.model").encode(TRICKY) == tok.encode(TRICKY)


def test_tokenizer_vocab_size_errors_are_user_errors(tmp_path):
    docs = [synthetic_source(0, 20)]
    with pytest.raises(UserError, match="too large.*--vocab-size"):
        train_tokenizer(docs, 50_000, tmp_path / "big.model")
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(docs, 100, tmp_path / "small.model")
    assert not (tmp_path / "big.model").exists()


def test_write_tokens_matches_direct_encoding(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tokens_module, "_CHUNK_CHARS", 500)  # many chunks, so worker order matters
    docs = [synthetic_source(100 + i, 10 + 7 * i) for i in range(12)]
    docs.insert(3, "")  # empty documents are skipped, not written as a lone EOS
    docs.append(TRICKY)
    tf = write_tokens(docs, tokenizer, tmp_path, "train", workers=2)

    kept = [d for d in docs if d]
    expected = [i for d in kept for i in tokenizer.encode(d) + [tokenizer.eos_id]]
    assert tf.tokens.dtype == np.uint16 and len(tf) == len(expected)
    np.testing.assert_array_equal(tf.tokens, expected)
    lengths = [len(tokenizer.encode(d)) + 1 for d in kept]
    np.testing.assert_array_equal(tf.doc_starts, np.cumsum([0] + lengths[:-1]))
    index = json.loads((tmp_path / "train.json").read_text())
    assert index["n_docs"] == len(kept) and index["n_tokens"] == len(expected)
    assert index["n_bytes"] == sum(len(d.encode()) for d in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.idx.npy", "train.json"]
    for start, doc in zip(tf.doc_starts, kept):
        n = len(tokenizer.encode(doc))
        assert tokenizer.decode(tf.tokens[start : start + n]) == doc
    serial = write_tokens(docs, tokenizer, tmp_path / "serial", "train", workers=1)
    np.testing.assert_array_equal(serial.tokens, tf.tokens)


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path, tokenizer):
    write_tokens(["old = 1\n"], tokenizer, tmp_path, "train", workers=1)

    def failing():
        yield "x = 1\n"
        raise UserError("stopped")

    with pytest.raises(UserError, match="stopped"):
        write_tokens(failing(), tokenizer, tmp_path, "train", workers=1)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "train.json").exists()
    with pytest.raises(UserError, match="does not exist"):
        TokenFile(tmp_path / "train")


def expected_window(stream: list[int], doc_of: list[int], index: int, length: int) -> dict:
    """The packing rules, spelled out one token at a time."""
    start = index * length
    segment, position, segments, positions, weights = 0, 0, [], [], []
    for p in range(length):
        o = start + p
        if p == 0 or doc_of[o] != doc_of[o - 1]:
            segment, position = segment + 1, 0
        else:
            position += 1
        segments.append(segment)
        positions.append(position)
        weights.append(1.0 if doc_of[o + 1] == doc_of[o] else 0.0)
    return {
        "tokens": stream[start : start + length],
        "targets": stream[start + 1 : start + length + 1],
        "segment_ids": segments,
        "positions": positions,
        "weights": weights,
    }


def test_packing_segments_and_positions(tmp_path):
    docs = ["abc", "defghij", "k", "lmnopqrstuvw", "xy", "zzzzzzzzzzzzzzzzz", "ab"]
    tf = char_token_file(tmp_path, docs)
    stream, doc_of = [], []
    for d, doc in enumerate(docs):
        ids = CharTokenizer().encode(doc) + [3]
        stream += ids
        doc_of += [d] * len(ids)
    for length in (1, 4, 5, 16):
        windows = PackedWindows(tf, length)
        assert len(windows) == (len(stream) - 1) // length
        for i in range(len(windows)):
            got = windows[i]
            want = expected_window(stream, doc_of, i, length)
            for key in want:
                assert got[key].shape == (length,)
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} L={length} i={i}")
            assert got["weights"].dtype == np.float32 and got["tokens"].dtype == np.int32
            # Only the EOS -> next document step is left out of the loss.
            np.testing.assert_array_equal(got["weights"] == 0, got["tokens"] == 3)
    batches = list(make_dataset(tf, 4, 2, seed=0, shuffle=False, num_epochs=1))
    windows = PackedWindows(tf, 4)
    assert len(batches) == len(windows) // 2
    for b, batch in enumerate(batches):
        for row in range(2):
            for key, value in windows[2 * b + row].items():
                np.testing.assert_array_equal(batch[key][row], value)


def test_packed_windows_pickle_without_the_memmap(tmp_path):
    import pickle

    windows = PackedWindows(char_token_file(tmp_path, numbered_docs(20)), 8)
    blob = pickle.dumps(windows)
    assert len(blob) < 1000
    assert_batches_equal([pickle.loads(blob)[3]], [windows[3]])


def test_shuffle_is_deterministic_for_a_seed(tmp_path):
    tf = char_token_file(tmp_path, numbered_docs(200))
    run = lambda seed: take(iter(make_dataset(tf, 8, 4, seed=seed)), 20)
    assert_batches_equal(run(0), run(0))
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(run(0), run(1)))

    windows = PackedWindows(tf, 8)
    epoch = list(make_dataset(tf, 8, 4, seed=5, num_epochs=1))
    rows = Counter(tuple(r) for b in epoch for r in b["tokens"])
    every = Counter(tuple(windows[i]["tokens"]) for i in range(len(windows)))
    # One epoch visits each window once (the last partial batch is dropped).
    assert not rows - every and rows.total() == len(windows) - len(windows) % 4
    in_order = [tuple(r) for b in epoch for r in b["tokens"]]
    assert in_order != [tuple(windows[i]["tokens"]) for i in range(len(in_order))]


@pytest.mark.parametrize("num_epochs", [None, 2])
def test_global_batch_independent_of_process_count(tmp_path, num_epochs):
    tf = char_token_file(tmp_path, numbered_docs(150, seed=1))
    global_batch = 8
    reference = list(make_dataset(tf, 6, global_batch, seed=3, num_epochs=2))[:30]
    steps = len(reference)
    for processes in (2, 4):
        per_process = []
        for p in range(processes):
            rows = range(p * global_batch // processes, (p + 1) * global_batch // processes)
            ds = make_dataset(tf, 6, global_batch, seed=3, rows=rows, num_epochs=num_epochs)
            per_process.append(take(iter(ds), steps))
            assert per_process[-1][0]["tokens"].shape == (global_batch // processes, 6)
        joined = [
            {key: np.concatenate([per_process[p][s][key] for p in range(processes)]) for key in reference[s]}
            for s in range(steps)
        ]
        assert_batches_equal(joined, reference)
    # Any subset of rows, in any grouping (a process holding rows 1 and 5; two processes of one
    # tensor group holding the same rows): each reads exactly those rows of every global batch.
    for rows in ([1, 5], [1, 5], [0, 1, 2, 3, 4, 5, 6, 7]):
        got = take(iter(make_dataset(tf, 6, global_batch, seed=3, rows=rows, num_epochs=num_epochs)), steps)
        assert_batches_equal(got, [{k: v[rows] for k, v in b.items()} for b in reference])
    if num_epochs is not None:
        steps_per_process = {
            len(list(make_dataset(tf, 6, 8, seed=3, rows=[2 * p, 2 * p + 1], num_epochs=2))) for p in range(4)
        }
        assert len(steps_per_process) == 1


def test_pipeline_errors_are_user_errors(tmp_path):
    tf = char_token_file(tmp_path, ["abcdefghij"])  # 11 tokens
    with pytest.raises(UserError, match="not a non-empty subset"):
        make_dataset(tf, 2, 6, seed=0, rows=[6])
    with pytest.raises(UserError, match="has 11 tokens.*needs at least 33.*train.seq_len"):
        make_dataset(tf, 4, 8, seed=0)
    assert len(list(make_dataset(tf, 5, 2, seed=0, num_epochs=1))) == 1


def test_iterator_state_resumes_exactly(tmp_path):
    tf = char_token_file(tmp_path, numbered_docs(100, seed=2))
    make = lambda: make_dataset(tf, 8, 4, seed=7, rows=[2, 3])
    iterator = iter(make())
    take(iterator, 37)
    state = iterator.get_state()
    expected = take(iterator, 10)
    resumed = iter(make())
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives a trip through a checkpoint file
    assert_batches_equal(take(resumed, 10), expected)


def test_jsonl_and_gz_inputs_with_text_field(tmp_path, tokenizer):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    first = [synthetic_source(200 + i, 5) for i in range(30)]
    second = [synthetic_source(300 + i, 5) for i in range(20)]
    lines = [json.dumps({"content": t, "id": i}) for i, t in enumerate(first)]
    (data / "a.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    with gzip.open(data / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"content": t}) + "\n" for t in second)
    (data / "notes.bin").write_bytes(b"\x00\x01")

    found = expand_inputs([str(data)])
    assert [p.name for p in found] == ["a.jsonl", "b.jsonl.gz"]
    assert expand_inputs([str(data / "**" / "*.jsonl*")]) == found
    assert list(iter_documents(found, text_field="content")) == first + second

    meta = prepare_corpus(
        [str(data)], tmp_path / "out", tokenizer_path=tokenizer.path, text_field="content", eval_fraction=0.1
    )
    train, held = TokenFile(tmp_path / "out" / "train"), TokenFile(tmp_path / "out" / "eval.json")
    assert held.n_docs >= 1 and train.n_docs + held.n_docs == 50
    assert meta["splits"]["eval"]["n_tokens"] == len(held) and meta["vocab_size"] == tokenizer.vocab_size
    copied = Tokenizer(tmp_path / "out" / "tokenizer.model")
    decoded = {
        copied.decode(tf.tokens[a:b][:-1])
        for tf in (train, held)
        for a, b in zip(tf.doc_starts, list(tf.doc_starts[1:]) + [len(tf)])
    }
    assert decoded == set(first + second)


def test_missing_input_is_user_error(tmp_path):
    with pytest.raises(UserError, match="nonexistent"):
        expand_inputs(["/nonexistent/corpus.txt"])
    with pytest.raises(UserError, match=r"\*\*/\*\.jsonl"):
        expand_inputs([str(tmp_path / "**" / "*.jsonl")])
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(UserError, match="does not exist.*launch.prepare"):
        TokenFile(tmp_path / "train")


def test_empty_corpus_is_user_error(tmp_path, tokenizer):
    with pytest.raises(UserError, match="empty"):
        write_tokens([], tokenizer, tmp_path, "train", workers=1)
    with pytest.raises(UserError, match="empty"):
        write_tokens(["", ""], tokenizer, tmp_path, "train", workers=2)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "in").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / "in" / name).write_text("")
    with pytest.raises(UserError, match="empty"):
        prepare_corpus([str(tmp_path / "in")], tmp_path / "out", vocab_size=300)


def test_missing_text_field_is_user_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(UserError, match=r"docs.jsonl:2 has no 'text' field.*--text-field"):
        list(iter_documents([path]))
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match="docs.jsonl:2 is not valid JSON"):
        list(iter_documents([path]))


def test_prepare_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    for args in (["--input", "/nonexistent/*.txt", "--out", str(tmp_path / "out")], ["--input", "x"]):
        proc = subprocess.run(
            [sys.executable, "-m", "launch.prepare", *args], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2
        assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_reuses_cached_output(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i:02d}.py").write_text(synthetic_source(400 + i, 40))
    out = tmp_path / "out"
    first = prepare_corpus([str(corpus)], out, vocab_size=320, eval_fraction=0.2, workers=1)
    assert not first["cached"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_corpus([str(corpus)], out, vocab_size=320, eval_fraction=0.2, workers=1)
    assert again["cached"] and {**again, "cached": False} == first
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    splits = first["splits"]
    assert splits["train"]["n_files"] + splits["eval"]["n_files"] == 12 and splits["eval"]["n_docs"] >= 1
    assert json.loads((out / "meta.json").read_text())["splits"] == splits

    assert not prepare_corpus([str(corpus)], out, vocab_size=320, eval_fraction=0.2, seed=1, workers=1)["cached"]
    (corpus / "m00.py").write_text("changed = True\n")
    assert not prepare_corpus([str(corpus)], out, vocab_size=320, eval_fraction=0.2, seed=1, workers=1)["cached"]


@pytest.mark.slow
def test_prepare_never_replaces_a_run_tokenizer_nor_other_output_unasked(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i:02d}.py").write_text(synthetic_source(400 + i, 40))
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text("{}")
    (run / "tokenizer.model").write_bytes(b"the run's own")
    out = tmp_path / "out"
    prepare_corpus([str(corpus)], out, vocab_size=320, eval_fraction=0.2, workers=1)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    base = [sys.executable, "-m", "launch.prepare", "--input", str(corpus), "--vocab-size", "320"]
    base += ["--eval-fraction", "0.2", "--workers", "1"]
    for target, extra, message in [
        (run, ["--overwrite"], "is a run directory"),
        (out, ["--seed", "1"], "pass --overwrite to replace them"),
    ]:
        proc = subprocess.run([*base, "--out", str(target), *extra], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (run / "tokenizer.model").read_bytes() == b"the run's own" and sorted(p.name for p in run.iterdir()) == [
        "recipe.json",
        "tokenizer.model",
    ]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # Asked to, it replaces them.
    again = prepare_corpus([str(corpus)], out, vocab_size=320, eval_fraction=0.2, seed=1, workers=1, overwrite=True)
    assert not again["cached"] and again["seed"] == 1


def test_stdlib_split_is_deterministic_and_disjoint():
    files = stdlib_files()
    root = stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100 and rel == sorted(rel)
    assert not any(part in ("site-packages", "dist-packages") for r in rel for part in r.split("/"))
    train, held = split_files(files, 0.02, seed=0)
    assert (train, held) == split_files(files, 0.02, seed=0)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(files)
    assert 0.005 < len(held) / len(files) < 0.05
    assert split_files(files, 0.02, seed=1)[1] != held
    # Deciding per file by hash: a file's side does not depend on which other files are listed.
    subset = files[::3]
    assert subset[0].parent == root  # same common folder, so the same relative names
    full_held = set(split_files(files, 0.5, seed=0)[1])
    assert set(split_files(subset, 0.5, seed=0)[1]) == {f for f in subset if f in full_held}
    tiny_train, tiny_held = split_files(files[:2], 0.001)
    assert len(tiny_train) == 1 and len(tiny_held) == 1


def test_split_depends_only_on_relative_paths(tmp_path):
    names = [f"pkg{i % 3}/mod{i}.py" for i in range(40)]
    splits = []
    for machine in ("home/alice/corpus", "mnt/data/copy"):
        for name in names:
            (tmp_path / machine / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / machine / name).write_text("x = 1\n")
        files = [tmp_path / machine / name for name in names]
        splits.append(
            [sorted(str(f.relative_to(tmp_path / machine)) for f in side) for side in split_files(files, 0.2)]
        )
    assert splits[0] == splits[1] and splits[0][1]
