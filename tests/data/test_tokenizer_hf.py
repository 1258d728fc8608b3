"""Our Tokenizer against transformers.AutoTokenizer on tokenizers the tests train themselves."""

import json
import shutil

import pytest

from lm.data import Tokenizer, train_tokenizer
from lm.data.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer
from lm.errors import UserError

transformers = pytest.importorskip("transformers")
from hf_builders import bpe_folder, corpus, spm_folder  # noqa: E402 (after the importorskip)

MIXED = [
    "Hello world",
    "def f(x):\n    return  x**2   # héllo ünïcode ✓ 日本語 🤗\n\n\t\ttabs\r\n",
    "  two leading spaces",
    " one leading space",
    "trailing   ",
    "",
    "   ",
    "a</s>b <s> c<|endoftext|>d<|begin_of_text|>e",
    "x = 123456 + 7.5e-3\n\n\n    if  y:\n        pass",
    "naïve café — “quotes” ‘single’ …",
]

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And  tabs\there? 日本"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "llama3_bpe": bpe_folder(root / "llama3_bpe", gpt2=False),
        "gpt2_bpe": bpe_folder(root / "gpt2_bpe", gpt2=True),
        "llama2_spm": spm_folder(root / "llama2_spm"),
    }


def assert_same_as_transformers(ours: Tokenizer, theirs, texts=MIXED):
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.vocab_size == len(theirs)


@pytest.mark.parametrize("name", ["llama3_bpe", "gpt2_bpe", "llama2_spm"])
def test_encode_decode_equal_autotokenizer(folders, name):
    ours = load_tokenizer(folders[name])
    theirs = transformers.AutoTokenizer.from_pretrained(folders[name])
    assert_same_as_transformers(ours, theirs)


@pytest.mark.parametrize("name", ["llama3_bpe", "gpt2_bpe", "llama2_spm"])
def test_decode_of_random_ids_equals_autotokenizer(folders, name):
    """What an untrained model emits: special ids, partial UTF-8 byte runs, pieces in any order."""
    import numpy as np

    ours = load_tokenizer(folders[name])
    theirs = transformers.AutoTokenizer.from_pretrained(folders[name])
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, ours.vocab_size, rng.integers(1, 40)).tolist()
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), ids


def test_bos_rule_follows_transformers(folders):
    assert load_tokenizer(folders["llama3_bpe"]).encode("x")[0] == load_tokenizer(folders["llama3_bpe"]).bos_id
    assert load_tokenizer(folders["llama2_spm"]).add_bos
    assert not load_tokenizer(folders["gpt2_bpe"]).add_bos
    forced = load_tokenizer(folders["gpt2_bpe"]).encode("x", add_bos=True)
    assert forced[0] == load_tokenizer(folders["gpt2_bpe"]).bos_id and len(forced) == 2


def test_add_bos_token_next_to_a_tokenizer_json_is_ignored_like_transformers(folders, tmp_path):
    """transformers drops add_bos_token when tokenizer.json exists: its post-processor alone decides."""
    folder = tmp_path / "no_post_processor"
    shutil.copytree(folders["llama3_bpe"], folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert_same_as_transformers(load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder))
    assert not load_tokenizer(folder).add_bos


def test_llama2_style_tokenizer_json_is_read_as_llama_tokenizer_reads_it(folders, tmp_path):
    """Llama 2's tokenizer.json normalizes with Prepend("▁"); transformers' LlamaTokenizer replaces that with
    its Metaspace rule (no "▁" after a special token, none before a leading space): so must we."""
    folder = tmp_path / "llama2_json"
    transformers.AutoTokenizer.from_pretrained(folders["llama2_spm"]).save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    spec["pre_tokenizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(theirs).__name__ == "LlamaTokenizer"
    assert_same_as_transformers(load_tokenizer(folder), theirs)


def test_every_eos_of_generation_config_is_a_stop_id(folders):
    tok = load_tokenizer(folders["llama3_bpe"])
    end_of_text, eot = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")
    assert tok.eos_id == eot and set(tok.stop_ids) == {end_of_text, eot}


@pytest.mark.parametrize("name", ["llama3_bpe", "llama2_spm"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_like_apply_chat_template(folders, name, add_generation_prompt):
    ours = load_tokenizer(folders[name])
    theirs = transformers.AutoTokenizer.from_pretrained(folders[name])
    text = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = theirs.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ours.encode(text, add_bos=False) == list(ids)


def test_chat_template_errors_are_one_line(folders):
    tok = load_tokenizer(folders["llama3_bpe"])
    with pytest.raises(UserError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(UserError, match="non-empty list"):
        tok.apply_chat_template([])


@pytest.fixture(scope="module")
def own_spm(tmp_path_factory):
    out = tmp_path_factory.mktemp("own")
    return train_tokenizer(corpus(), 400, out / "tokenizer.model")


def test_own_sentencepiece_exports_to_an_equal_autotokenizer(own_spm, tmp_path):
    own_spm.save_pretrained(tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in MIXED:
        ids = own_spm.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids, skip_special_tokens=True) == own_spm.decode(ids) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        own_spm.bos_id,
        own_spm.eos_id,
        own_spm.pad_id,
    )
    # ...and reloading the export gives our tokenizer back.
    again = load_tokenizer(tmp_path / "hf")
    assert [again.encode(t) for t in MIXED] == [own_spm.encode(t) for t in MIXED]
    assert again.eos_id == own_spm.eos_id and not again.add_bos


def test_default_chat_template_renders_the_documented_format(own_spm, tmp_path):
    text = own_spm.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    assert text == "<|system|>\nYou answer in one line.\n<|user|>\n  What is 2+2?  \n<|assistant|>\n"
    own_spm.save_pretrained(tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.chat_template == DEFAULT_CHAT_TEMPLATE
    assert theirs.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True) == text


def test_hf_folder_round_trips_through_save_pretrained(folders, tmp_path):
    tok = load_tokenizer(folders["llama3_bpe"])
    tok.save_pretrained(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.sha256 == tok.sha256 and again.encode(MIXED[1]) == tok.encode(MIXED[1])
    assert again.stop_ids == tok.stop_ids and len(tok.stop_ids) == 2  # generation_config.json goes along


def test_chat_template_jinja_file_as_transformers_5_saves_it(folders, tmp_path):
    theirs = transformers.AutoTokenizer.from_pretrained(folders["llama3_bpe"])
    theirs.save_pretrained(tmp_path / "saved")
    jinja = tmp_path / "saved" / "chat_template.jinja"
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert jinja.is_file() and "chat_template" not in config
    ours = load_tokenizer(tmp_path / "saved")
    assert ours.chat_template == jinja.read_text()
    for prompt in (False, True):
        text = ours.apply_chat_template(CHAT, add_generation_prompt=prompt)
        assert text == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
    ours.save_pretrained(tmp_path / "run")  # what a run keeps of it
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == jinja.read_text()
    assert load_tokenizer(tmp_path / "run").chat_template == ours.chat_template


def test_run_directory_and_model_file_load_the_same_tokenizer(own_spm):
    from_dir = load_tokenizer(own_spm.path.parent)
    assert from_dir.kind == "sentencepiece" and from_dir.sha256 == own_spm.sha256
    assert from_dir.encode(MIXED[1]) == own_spm.encode(MIXED[1])


def test_folder_without_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a tokenizers file"):
        load_tokenizer(tmp_path)
