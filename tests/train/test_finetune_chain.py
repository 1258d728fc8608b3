"""The fine-tune chain as transformers 5 checkpoints meet it: a Gemma-style chat model whose template
lives in chat_template.jinja, whose generation_config.json lists two eos ids (EOS and <end_of_turn>)
and whose tokenizer is a tokenizer.model; imported with launch.convert, then fine-tuned with
init.from=<the imported run>, then exported. The tokenizer (BOS, specials, template) and the stop ids
survive every step."""

import json

import pytest
from helpers import run_cli

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
from hf_builders import spm_folder, tiny_llama  # noqa: E402

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_style_folder(root):
    tok = spm_folder(root / "tok", user_symbols=("<start_of_turn>", "<end_of_turn>"))
    config = json.loads((tok / "tokenizer_config.json").read_text())
    del config["chat_template"]  # transformers 5 keeps it in its own file
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "chat_template.jinja").write_text(TEMPLATE)
    folder = tiny_llama(root / "hf", tok, vocab_size=400, context=64)
    eot = transformers.AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<end_of_turn>")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, eot]}))
    return folder, eot


def test_imported_chat_model_keeps_tokenizer_template_and_stop_ids_through_a_finetune(tmp_path):
    from lm.data import TokenFile
    from lm.data.tokenizer import load_tokenizer

    hf, eot = gemma_style_folder(tmp_path)
    out = run_cli("launch.convert", "--hf-in", str(hf), "--out", str(tmp_path / "imported"))
    assert out.returncode == 0, out.stderr[-2000:]
    chat = tmp_path / "chat.jsonl"
    records = [
        {"messages": [{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
        for a in range(1, 13) for b in range(1, 13)
    ]  # fmt: skip
    chat.write_text("".join(json.dumps(r) + "\n" for r in records))
    ft = tmp_path / "ft"
    sets = [
        f"init.from={tmp_path / 'imported'}",
        f'data.inputs=["{chat}"]',
        *("train.seq_len=32", "train.batch_size=4", "train.steps=2", "train.eval_every=2", "train.log_every=1"),
        *("train.sample_tokens=4", "checkpoint.every=2"),
    ]
    args = [x for s in sets for x in ("--set", s)]
    out = run_cli("launch.train", "--recipe", "finetune_tiny", "--run-dir", str(ft), *args)
    assert out.returncode == 0, out.stderr[-3000:]

    source, tuned = load_tokenizer(hf), load_tokenizer(ft)
    assert tuned.kind == source.kind == "hf-sentencepiece" and tuned.add_bos and tuned.bos_id == 1
    assert tuned.stop_ids == source.stop_ids == (2, eot)
    assert tuned.chat_template == TEMPLATE == (ft / "chat_template.jinja").read_text()
    assert tuned.encode("<end_of_turn>", add_bos=False) == [eot]  # a special token, not text
    # The training data was encoded with that tokenizer: every example starts with the template's BOS
    # and its reply ends with <end_of_turn>, which trains.
    data = TokenFile(ft / "data" / "train")
    first = data.tokens[data.doc_starts[0] : data.doc_starts[1]].tolist()
    assert first[0] == 1 and eot in first
    assert data.mask[data.doc_starts[0] + first.index(eot, first.index(eot) + 1)] == 1  # the reply's own

    out = run_cli("launch.convert", "--run-dir", str(ft), "--hf-out", str(tmp_path / "export"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"] == [2, eot]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert theirs.chat_template == TEMPLATE
