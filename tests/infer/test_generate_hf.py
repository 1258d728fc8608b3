"""launch.generate --hf against transformers' greedy generate, and decoding with several stop ids."""

import json
import shutil

import pytest
from helpers import run_cli

from lm.infer.decode import generate


def test_a_row_ends_at_the_first_of_several_stop_ids(tiny_cfg):
    from flax import nnx

    from lm.model import Transformer

    model = Transformer(tiny_cfg, rngs=nnx.Rngs(0))
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    free = generate(model, prompts, max_new_tokens=12).tokens
    # Stop ids: one that row 0 makes at step 4 and one that no row makes before it (or at all).
    stop = free[0][4]
    other = next(t for t in range(4, 256) if t not in free[0][:5] and t not in free[1])
    got = generate(model, prompts, max_new_tokens=12, eos_id=(other, stop)).tokens
    first = free[0].index(stop)
    assert got[0] == free[0][: first + 1]
    assert got[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from hf_builders import bpe_folder, spm_folder, tiny_llama  # noqa: E402 (after the importorskip)

PROMPT = "def main():\n    x = "


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_hf")
    return {
        "bpe": tiny_llama(root / "bpe_model", bpe_folder(root / "bpe", gpt2=False)),
        "spm": tiny_llama(root / "spm_model", spm_folder(root / "spm")),
    }


def transformers_greedy(folder, ids: list[int], n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([ids])  # an explicit mask: with none, transformers masks every id equal to pad_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    ends = [i for i, t in enumerate(new) if t in eos]
    return new[: ends[0] + 1] if ends else new


def generate_cli(folder, tmp_path, *extra):
    out = run_cli(
        "launch.generate",
        "--hf",
        str(folder),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "16",
        "--output",
        str(tmp_path / "out.jsonl"),
        *extra,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_greedy_generate_hf_equals_transformers(models, kind, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(models[kind])
    expected = transformers_greedy(models[kind], tok(PROMPT)["input_ids"], 16)
    row = generate_cli(models[kind], tmp_path)
    assert row["tokens"] == expected
    prompt_ids = tok(PROMPT)["input_ids"]
    whole = tok.decode(prompt_ids + expected, skip_special_tokens=True)
    assert row["completion"] == whole[len(tok.decode(prompt_ids, skip_special_tokens=True)) :]


@pytest.mark.slow
def test_greedy_stops_at_a_generation_config_eos_like_transformers(models, tmp_path):
    """Make the 5th greedy token an eos of generation_config.json: both must stop there."""
    folder = tmp_path / "model"
    shutil.copytree(models["bpe"], folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    free = transformers_greedy(folder, tok(PROMPT)["input_ids"], 16)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [tok.eos_token_id, free[4]]
    (folder / "generation_config.json").write_text(json.dumps(config))
    expected = transformers_greedy(folder, tok(PROMPT)["input_ids"], 16)
    assert expected == free[: free.index(free[4]) + 1]
    assert generate_cli(folder, tmp_path)["tokens"] == expected


@pytest.mark.slow
def test_chat_prompt_uses_the_template_like_transformers(models, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(models["bpe"])
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=False)
    expected = transformers_greedy(models["bpe"], list(ids), 16)
    assert generate_cli(models["bpe"], tmp_path, "--chat")["tokens"] == expected


@pytest.mark.slow
def test_prompt_longer_than_context_is_one_line_error(models):
    out = run_cli("launch.generate", "--hf", str(models["bpe"]), "--prompt", "word " * 200)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "exceeds the model's context" in lines[0]
