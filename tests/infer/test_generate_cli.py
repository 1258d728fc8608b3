"""launch.generate as a user runs it: output files, cache on/off, interactive mode, bad input."""

import json
import shutil

import pytest
from helpers import run_cli, tiny_train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    out = run_cli(*tiny_train_args(tiny_corpus, run_dir, "train.steps=8"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def generate(*args, **kw):
    return run_cli("launch.generate", *args, **kw)


def test_output_jsonl_and_cache_off_agree(run_dir, tmp_path):
    rows = {}
    for cache in ("on", "off"):
        out = generate(
            "--run-dir",
            str(run_dir),
            "--prompt",
            "def ",
            "--prompt",
            "import os\n",
            "--prompt",
            "class A:",
            "--max-new-tokens",
            "12",
            "--kv-cache",
            cache,
            "--output",
            str(tmp_path / f"{cache}.jsonl"),
        )
        assert out.returncode == 0, out.stderr[-2000:]
        rows[cache] = [json.loads(line) for line in (tmp_path / f"{cache}.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows["on"]] == [r["tokens"] for r in rows["off"]]
    for r in rows["on"]:
        assert set(r) == {"prompt", "completion", "tokens", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_single_prompt_streams_and_checkpoint_folder_works(run_dir):
    out = generate("--checkpoint", str(run_dir / "checkpoints" / "8"), "--prompt", "def ", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("def ")


def test_interactive_mode_answers_each_prompt(run_dir):
    out = run_cli(
        "launch.generate",
        "--run-dir",
        str(run_dir),
        "--interactive",
        "--max-new-tokens",
        "6",
        stdin="def \n\nimport\n\n",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("def ") >= 1 and "import" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x" * 400, "--max-new-tokens", "10"], "exceeds the model's context of 64 tokens"),
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "def ", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
    ],
)
def test_bad_generation_input(run_dir, args, message):
    out = generate("--run-dir", str(run_dir), *args)
    assert out.returncode == 2 and message in out.stderr.strip().splitlines()[-1], out.stderr[-1000:]


def test_unknown_run_and_foreign_tokenizer(run_dir, tmp_path, tiny_corpus):
    out = generate("--run-dir", str(tmp_path / "nope"), "--prompt", "x")
    assert out.returncode == 2 and "is not a run directory" in out.stderr
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    from lm.data import iter_documents, train_tokenizer

    train_tokenizer(iter_documents(sorted(tiny_corpus.glob("*.txt"))), 600, copy / "tokenizer.model")
    out = generate("--run-dir", str(copy), "--prompt", "x")
    assert out.returncode == 2 and "is not the tokenizer checkpoint 8 was trained with" in out.stderr, out.stderr[-500:]


def test_output_streams_by_batch_samples_each_batch_anew_and_is_never_overwritten(run_dir, tmp_path):
    """The same prompt in batches 0 and 1 gets two samples (the batch index is folded into the key);
    an over-long prompt in batch 2 ends the command with one line, and --output keeps batches 0-1;
    a second command refuses to replace that file without --overwrite."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \ndef \n" + "x" * 400 + "\n")
    output = tmp_path / "out.jsonl"
    sample = ["--temperature", "1.0", "--seed", "3", "--batch-size", "1", "--max-new-tokens", "12"]
    out = generate("--run-dir", str(run_dir), "--prompts-file", str(prompts), *sample, "--output", str(output))
    assert out.returncode == 2 and "exceeds the model's context" in out.stderr.strip().splitlines()[-1], out.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["def ", "def "]
    assert rows[0]["tokens"] != rows[1]["tokens"]
    assert not list(tmp_path.glob(".*partial"))
    before = output.read_bytes()
    out = generate("--run-dir", str(run_dir), "--prompt", "def ", "--output", str(output))
    assert out.returncode == 2 and "already exists; pass --overwrite" in out.stderr, out.stderr[-500:]
    assert output.read_bytes() == before
