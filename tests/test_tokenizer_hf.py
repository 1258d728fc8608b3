"""Our Tokenizer against transformers.AutoTokenizer on tokenizers the tests train themselves."""

import io
import json
import pathlib

import pytest

from lm.data import Tokenizer, train_tokenizer
from lm.data.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer
from lm.errors import UserError

transformers = pytest.importorskip("transformers")

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

TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And  tabs\there? 日本"},
]


def corpus() -> list[str]:
    root = pathlib.Path(transformers.__file__).parent
    return [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:12]]


def bpe_folder(out: pathlib.Path, *, gpt2: bool) -> pathlib.Path:
    """A byte-level BPE trained here: Llama 3 style (BOS by the post-processor) or GPT-2 style (no BOS)."""
    from tokenizers import Tokenizer as JsonTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>"] if gpt2 else ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = JsonTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    if gpt2:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": specials[0], "eos_token": specials[0]}
    else:
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": specials[2],
            "chat_template": TEMPLATE,
        }
        eos_ids = [tok.token_to_id(specials[1]), tok.token_to_id(specials[2])]
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def spm_folder(out: pathlib.Path) -> pathlib.Path:
    """A Llama 2 style sentencepiece BPE (dummy prefix, byte fallback) saved as an HF tokenizer.model."""
    import sentencepiece as spm

    model = io.BytesIO()
    lines = [line for doc in corpus() for line in doc.splitlines(keepends=True)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, pad_id=-1, unk_id=0, bos_id=1, eos_id=2,
        minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


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


def test_bos_rule_follows_transformers(folders):
    assert load_tokenizer(folders["llama3_bpe"]).encode("x")[0] == load_tokenizer(folders["llama3_bpe"]).bos_id
    assert load_tokenizer(folders["llama2_spm"]).add_bos
    assert not load_tokenizer(folders["gpt2_bpe"]).add_bos
    forced = load_tokenizer(folders["gpt2_bpe"]).encode("x", add_bos=True)
    assert forced[0] == load_tokenizer(folders["gpt2_bpe"]).bos_id and len(forced) == 2


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
        own_spm.bos_id, own_spm.eos_id, own_spm.pad_id,
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
