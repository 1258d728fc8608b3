"""launch.score against transformers: mean NLL of texts (windowed past the context), dumped logits, bad input."""

import json
import math
import shutil

import numpy as np
import pytest
from helpers import run_cli

from lm.errors import UserError
from lm.infer.score import check_window, windows

CONTEXT = 64


@pytest.mark.parametrize("window, stride", [(CONTEXT, None), (CONTEXT, 5), (16, 15), (17, 1)])
def test_windows_score_every_token_once_with_window_minus_stride_before_it(window, stride):
    for n in (2, 5, 63, 64, 65, 100, 200, 257):
        scored = []
        for start, end, first in windows(n, window, stride):
            assert end - start <= window and start < first <= end
            scored += list(range(first, end))
            if start > 0:  # every later window sees at least window - stride tokens of context
                assert first - start >= window - (stride or window // 2)
        assert scored == list(range(1, n)), n
    assert check_window(None, None, 64) == (64, 32) and check_window(None, None, 131072) == (4096, 2048)
    with pytest.raises(UserError, match=r"--window=65 must be in \[2, 64\]"):
        check_window(65, None, 64)


# ---- against transformers (CLI, a tiny random Llama saved by the test) ---------------------------------

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from hf_builders import bpe_folder, spm_folder, tiny_llama  # noqa: E402 (after the importorskip)

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\n\nclass Thing:\n    '''A docstring, ünïcode ✓.'''\n" * 6,  # longer than CONTEXT
    "x",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    return {
        "bpe": tiny_llama(root / "bpe_model", bpe_folder(root / "bpe", gpt2=False), context=CONTEXT),
        "spm": tiny_llama(root / "spm_model", spm_folder(root / "spm"), context=CONTEXT),
    }


def reference_nll(folder, texts, window: int = CONTEXT, stride: int = CONTEXT // 2) -> tuple[float, int]:
    """transformers' NLL by the perplexity guide's strided windows, BOS or EOS first."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        if not ids or ids[0] != tok.bos_token_id:
            ids = [tok.eos_token_id, *ids]
        ids = torch.tensor([ids])
        prev_end = 0
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + window, ids.shape[1])
            piece = ids[:, begin:end]
            with torch.no_grad():
                logp = torch.log_softmax(model(piece).logits.float(), dim=-1)
            nll = -logp[0, :-1].gather(-1, piece[0, 1:, None])[:, 0]
            new = max(prev_end, begin + 1)  # targets not scored by an earlier window
            total += float(nll[new - begin - 1 :].sum())
            count += end - new
            prev_end = end
            if end == ids.shape[1]:
                break
    return total, count


def score(*args):
    return run_cli("launch.score", *args)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_score_mean_nll_equals_transformers(models, kind, tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = score("--hf", str(models[kind]), "--input", str(tmp_path / "docs.jsonl"), "--batch-size", "3", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    total, count = reference_nll(models[kind], TEXTS)
    assert got["tokens"] == count and got["documents"] == len(TEXTS)
    assert got["mean_nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)

    (tmp_path / "one.txt").write_text(TEXTS[1])
    out = score("--hf", str(models[kind]), "--input", str(tmp_path / "one.txt"))
    assert out.returncode == 0, out.stderr[-3000:]
    total, count = reference_nll(models[kind], TEXTS[1:2])
    assert f"{count:,} tokens" in out.stdout and f"mean NLL {total / count:.4f}" in out.stdout
    if kind == "bpe":  # a shorter window and stride than the context: the same rule, by transformers
        out = score("--hf", str(models[kind]), "--input", str(tmp_path / "one.txt"), "--window", "24", "--stride", "7")
        assert out.returncode == 0, out.stderr[-3000:]
        total, count = reference_nll(models[kind], TEXTS[1:2], window=24, stride=7)
        assert f"{count:,} tokens" in out.stdout and f"mean NLL {total / count:.4f}" in out.stdout


@pytest.mark.slow
def test_dump_logits_equal_transformers_without_tokenizer_files(models, tmp_path):
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(models["bpe"] / name, weights_only / name)
    ids = np.random.default_rng(0).integers(0, 400, (3, 40))
    np.save(tmp_path / "ids.npy", ids)
    out = score(
        "--hf",
        str(weights_only),
        "--token-ids",
        str(tmp_path / "ids.npy"),
        "--dump-logits",
        str(tmp_path / "logits.npy"),
        "--batch-size",
        "2",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ours = np.load(tmp_path / "logits.npy")
    model = transformers.AutoModelForCausalLM.from_pretrained(weights_only, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, 40, 400)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    logp = torch.log_softmax(torch.tensor(theirs), -1)[:, :-1].gather(-1, torch.tensor(ids)[:, 1:, None])
    assert json.loads(out.stdout)["mean_nll"] == pytest.approx(float(-logp.mean()), rel=1e-5)
    # The file is never replaced silently, and never the input itself (even with --overwrite).
    before = (tmp_path / "logits.npy").read_bytes()
    for target, extra, message in [
        ("logits.npy", [], "already exists; pass --overwrite"),
        ("ids.npy", ["--overwrite"], "is this command's input"),
    ]:
        args = ["--hf", str(weights_only), "--token-ids", str(tmp_path / "ids.npy"), *extra]
        out = score(*args, "--dump-logits", str(tmp_path / target))
        assert out.returncode == 2 and message in out.stderr, out.stderr[-1000:]
    assert (tmp_path / "logits.npy").read_bytes() == before and np.array_equal(np.load(tmp_path / "ids.npy"), ids)


@pytest.mark.slow
def test_bad_inputs_are_one_line_and_exit_2(models, tmp_path):
    small = tmp_path / "small_vocab"
    tiny_llama(small, models["bpe"], vocab_size=300, context=CONTEXT)  # the tokenizer has 400 tokens
    (tmp_path / "a.txt").write_text("hello")
    np.save(tmp_path / "big.npy", np.full((1, 8), 999))
    np.save(tmp_path / "long.npy", np.zeros((1, CONTEXT + 1), np.int64))
    np.save(tmp_path / "float.npy", np.zeros((1, 8)))
    (tmp_path / "not_a_model").mkdir()
    cases = {
        "400 tokens but the model": ["--hf", str(small), "--input", str(tmp_path / "a.txt")],
        "does not exist": ["--hf", str(models["bpe"]), "--input", str(tmp_path / "missing.txt")],
        "not a Hugging Face model folder": ["--hf", str(tmp_path / "not_a_model"), "--input", str(tmp_path / "a.txt")],
        "vocab_size=400": ["--hf", str(models["bpe"]), "--token-ids", str(tmp_path / "big.npy")],
        "context is 64": ["--hf", str(models["bpe"]), "--token-ids", str(tmp_path / "long.npy")],
        "float64 values": ["--hf", str(models["bpe"]), "--token-ids", str(tmp_path / "float.npy")],
        "needs --token-ids": ["--hf", str(models["bpe"]), "--input", str(tmp_path / "a.txt"), "--dump-logits", "x"],
        "--window=1 must be at least 2": [
            "--hf",
            str(models["bpe"]),
            "--input",
            str(tmp_path / "a.txt"),
            "--window",
            "1",
        ],
        "--stride=8 must be in [1, 7] for --window=8": [
            *("--hf", str(models["bpe"]), "--input", str(tmp_path / "a.txt"), "--window", "8", "--stride", "8")
        ],
    }
    for expected, args in cases.items():
        out = score(*args)
        assert out.returncode == 2, (expected, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (expected, lines)
