"""launch.convert as a user runs it: import a Hugging Face folder as a run, export a run back."""

import json

import numpy as np
import pytest
from helpers import run_cli
from hf_models import hf_logits, sample_tokens, save_hf_checkpoint

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def _bpe_tokenizer(folder):
    """A tiny byte-level BPE tokenizer.json trained here, with its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "hello world, hello tokens"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_import_run_scores_like_transformers_and_exports_back(tmp_path):
    import transformers

    hf = tmp_path / "hf"
    reference = save_hf_checkpoint("gemma2", hf)
    _bpe_tokenizer(hf)
    run = tmp_path / "run"
    result = run_cli("launch.convert", "--hf-in", str(hf), "--out", str(run))
    assert result.returncode == 0, result.stderr
    for name in ("recipe.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "recipe.json").read_text())["model"]["post_norms"] is True

    # The converted run is a run: launch.score reads it, and its logits are transformers'.
    np.save(tmp_path / "ids.npy", sample_tokens())
    result = run_cli(
        "launch.score", "--run-dir", str(run), "--token-ids", str(tmp_path / "ids.npy"),
        "--dump-logits", str(tmp_path / "logits.npy"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    want = hf_logits(reference, sample_tokens())
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-4)

    out = tmp_path / "out"
    result = run_cli("launch.convert", "--run-dir", str(run), "--hf-out", str(out))
    assert result.returncode == 0, result.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(back, sample_tokens()), want, atol=1e-5)
    theirs, ours = (transformers.AutoTokenizer.from_pretrained(p) for p in (hf, out))
    assert ours("def f(x): hello")["input_ids"] == theirs("def f(x): hello")["input_ids"]

    # Neither direction writes over an earlier output unasked; --overwrite replaces the weights and
    # leaves other files (a model_ema.safetensors beside them) alone.
    again = run_cli("launch.convert", "--run-dir", str(run), "--hf-out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    first = (out / "model.safetensors").read_bytes()
    (out / "model_ema.safetensors").write_bytes(b"not ours")
    again = run_cli("launch.convert", "--run-dir", str(run), "--hf-out", str(out), "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() == first
    assert (out / "model_ema.safetensors").read_bytes() == b"not ours"
    assert not list(out.glob(".*partial"))


def _bad_folder(tmp_path, what):
    folder = tmp_path / what
    if what == "not_a_model":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
        return folder
    save_hf_checkpoint("llama", folder, **({"max_shard_size": "20KB"} if what == "missing_shard" else {}))
    config = json.loads((folder / "config.json").read_text())
    if what == "unknown_architecture":
        config.update(model_type="falcon", architectures=["FalconForCausalLM"])
    elif what == "rope_longrope":
        config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0}
    elif what == "wrong_shape":
        config["intermediate_size"] = 80
    elif what == "missing_shard":
        sorted(folder.glob("model-*.safetensors"))[0].unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "what, message",
    [
        ("unknown_architecture", "model_type='falcon' is not supported"),
        ("rope_longrope", "rope_type='longrope' is not supported"),
        ("missing_shard", "lacks shard model-00001-of-"),
        ("wrong_shape", "has shape [96, 48]"),
        ("not_a_model", "is not a Hugging Face model folder"),
    ],
)
def test_bad_hf_folder_is_one_line_exit_2_and_writes_nothing(tmp_path, what, message):
    run = tmp_path / "run"
    result = run_cli("launch.convert", "--hf-in", str(_bad_folder(tmp_path, what)), "--out", str(run))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (run / "recipe.json").exists()
