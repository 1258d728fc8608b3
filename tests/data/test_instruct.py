"""Instruction and chat data (lm.data.instruct): masks, truncation, packing, and the completion-only loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.data import TokenFile, make_dataset, prepare_corpus
from lm.data.instruct import Example, encode_chat, encode_record, truncate
from lm.data.pipeline import PackedExamples
from lm.data.tokenizer import load_tokenizer
from lm.errors import UserError
from lm.model import Transformer

transformers = pytest.importorskip("transformers")
L = 64  # train.seq_len of these tests
from hf_builders import bpe_folder  # noqa: E402

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course."},
]
# The tests' template with transformers' {% generation %} markers around what the assistant writes, so
# that transformers' own return_assistant_tokens_mask gives an independent mask to compare with.
GENERATION_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}\n{% endgeneration %}"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = bpe_folder(tmp_path_factory.mktemp("tok") / "bpe", gpt2=False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GENERATION_TEMPLATE}))
    return out


def test_chat_tokens_and_assistant_mask_equal_transformers(folder):
    ours = load_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    example = encode_chat(CHAT, ours)
    out = theirs.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    # Our example ends with the EOS that separates packed documents; the template's text is the rest.
    assert example.ids[:-1] == out["input_ids"]
    assert example.mask[:-1] == out["assistant_masks"]
    assert example.ids[-1] == ours.eos_id and example.mask[-1] == 0


def test_completion_masks_the_prompt_and_trains_the_eos(folder):
    tok = load_tokenizer(folder)
    ex = encode_record({"prompt": "Q: hello?\nA:", "completion": " hi there"}, "auto", tok)
    p = tok.encode("Q: hello?\nA:")  # as generate encodes a prompt: with the tokenizer's BOS
    assert ex.ids == p + tok.encode(" hi there", add_bos=False) + [tok.eos_id]
    assert ex.mask == [0] * len(p) + [1] * (len(ex.ids) - len(p))


def test_completion_and_text_start_with_bos_exactly_as_transformers_and_generate_do(folder):
    from hf_builders import bpe_folder as build

    for path in (folder, build(folder.parent / "gpt2", gpt2=True)):  # BOS added / no BOS at all
        ours, theirs = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
        prompt, text = "Say alpha beta:", "def f(x):\n    return x"
        ex = encode_record({"prompt": prompt, "completion": " gamma"}, "completion", ours)
        assert ex.ids[: len(theirs(prompt)["input_ids"])] == theirs(prompt)["input_ids"]
        assert encode_record({"text": text}, "text", ours).ids == theirs(text)["input_ids"] + [ours.eos_id]
        assert (ex.ids[0] == ours.bos_id) == ours.add_bos == (path == folder)


def test_eos_after_a_final_reply_trains_unless_the_template_wrote_a_stop_token(folder):
    tok = load_tokenizer(folder)
    with_stop = encode_chat(CHAT, tok)  # GENERATION_TEMPLATE ends each reply with the EOS itself
    assert with_stop.ids[-1] == tok.eos_id and with_stop.mask[-1] == 0
    tok.chat_template = GENERATION_TEMPLATE.replace("{{ eos_token }}", "")  # a template with no end-of-turn
    bare = encode_chat(CHAT, tok)
    assert bare.ids[-1] == tok.eos_id and bare.mask[-1] == 1  # the model learns to stop
    bare = encode_chat(CHAT[:-1], tok)  # ends on a user turn: the EOS only separates
    assert bare.mask[-1] == 0


def test_truncation_keeps_prompt_tail_and_completion_head():
    ex = Example(list(range(10)), [0] * 6 + [1] * 4)
    cut, was = truncate(ex, 7)  # drop 3 from the left: all prompt
    assert was and cut.ids == [3, 4, 5, 6, 7, 8, 9] and cut.mask == [0, 0, 0, 1, 1, 1, 1]
    cut, _ = truncate(ex, 3)  # the whole prompt goes, then the completion's tail
    assert cut.ids == [6, 7, 8] and cut.mask == [1, 1, 1]
    assert truncate(ex, 10) == (ex, False)


def test_bad_records_are_one_line_errors(folder):
    tok = load_tokenizer(folder)
    with pytest.raises(UserError, match="no assistant turn"):
        encode_record({"messages": [{"role": "user", "content": "hi"}]}, "auto", tok, "f.jsonl:3")
    with pytest.raises(UserError, match="none of the fields"):
        encode_record({"question": "hi"}, "auto", tok, "f.jsonl:4")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def completions(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "theta", "kappa"]
    return [
        {
            "prompt": "Say " + " ".join(rng.choice(words, 1 + i % 5)) + ":",
            "completion": " " + " ".join(rng.choice(words, 1 + (i * 3) % 4)),
        }
        for i in range(n)
    ]


def prepare(tmp_path, folder, records, seq_len=L, name="data"):
    src = write_jsonl(tmp_path / f"{name}.jsonl", records)
    meta = prepare_corpus([str(src)], tmp_path / name, tokenizer_path=folder, eval_fraction=0.1, seq_len=seq_len)
    return tmp_path / name, meta


def test_packed_examples_never_split_an_example(tmp_path, folder):
    data, meta = prepare(tmp_path, folder, completions())
    tf = TokenFile(data / "train")
    assert tf.mask is not None and meta["splits"]["train"]["truncated"] == 0
    src = PackedExamples(tf, L)
    starts = set(tf.doc_starts.tolist())
    n_docs = 0
    for i in range(len(src)):
        w = src[i]
        seg = w["segment_ids"]
        n_docs += len(set(seg[seg > 0].tolist()))
        assert (w["weights"][seg == 0] == 0).all() and (w["positions"][seg > 0][0] == 0)
        # each segment starts at position 0 and runs to a document end
        for s in set(seg[seg > 0].tolist()):
            assert w["positions"][seg == s][0] == 0
    assert n_docs == tf.n_docs and len(starts) == tf.n_docs


def per_token_losses(model, batch):
    logits = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
    return np.asarray(nll * batch["weights"]), np.asarray(batch["weights"])


def tiny_model(vocab):
    cfg = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_loss_equals_mean_over_completion_tokens_computed_independently(tmp_path, folder):
    records = completions(24)
    data, _ = prepare(tmp_path, folder, records)
    tf = TokenFile(data / "train")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    model = tiny_model(load_tokenizer(folder).vocab_size)
    batch = next(iter(make_dataset(tf, L, len(PackedExamples(tf, L)), 0, shuffle=False, num_epochs=1)))
    terms, weights = per_token_losses(model, batch)
    packed = terms.sum() / weights.sum()

    # Independently: each training record alone, tokenised by transformers, loss on completion + EOS only.
    eos = theirs.convert_tokens_to_ids(theirs.eos_token)
    held = set()
    total, count = 0.0, 0
    train_ids = [tuple(tf.tokens[s:e]) for s, e in zip(tf.doc_starts, list(tf.doc_starts[1:]) + [tf.n_tokens])]
    for r in records:
        p = theirs(r["prompt"])["input_ids"]  # the prompt as generate sees it, BOS included
        c = theirs(r["completion"], add_special_tokens=False)["input_ids"] + [eos]
        if tuple(p + c) not in train_ids:
            held.add(r["prompt"])
            continue
        ids = jnp.asarray([p + c])
        logits = model(ids, jnp.arange(len(p + c))[None])
        logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        for t in range(len(p) - 1, len(p + c) - 1):
            total -= float(logp[t, p[t + 1] if t + 1 < len(p) else c[t + 1 - len(p)]])
            count += 1
    assert count == int(weights.sum()) and held
    np.testing.assert_allclose(packed, total / count, rtol=2e-5)


def test_changing_a_prompt_token_changes_no_loss_term_at_a_prompt_position(tmp_path, folder):
    data, _ = prepare(tmp_path, folder, completions(12))
    tf = TokenFile(data / "train")
    batch = next(iter(make_dataset(tf, L, len(PackedExamples(tf, L)), 0, shuffle=False, num_epochs=1)))
    model = tiny_model(load_tokenizer(folder).vocab_size)
    terms, weights = per_token_losses(model, batch)
    # A prompt token: input j of the first row whose own target weight and whose predecessor's are 0.
    row = 0
    j = next(j for j in range(2, L) if weights[0, j] == 0 and weights[0, j - 1] == 0 and batch["segment_ids"][0, j])
    changed = {k: v.copy() for k, v in batch.items()}
    changed["tokens"][row, j] = (batch["tokens"][row, j] + 1) % 300
    changed["targets"][row, j - 1] = changed["tokens"][row, j]
    terms2, weights2 = per_token_losses(model, changed)
    np.testing.assert_array_equal(weights, weights2)
    prompt = weights == 0
    np.testing.assert_array_equal(terms[prompt], 0.0)
    np.testing.assert_array_equal(terms2[prompt], 0.0)
    same_doc = (batch["segment_ids"][row] == batch["segment_ids"][row, j]) & (weights[row] > 0)
    assert not np.allclose(terms[row][same_doc], terms2[row][same_doc])  # its completion does see it


def test_long_examples_are_truncated_and_counted(tmp_path, folder):
    records = completions(20) + [{"prompt": "word " * 80, "completion": " alpha beta"}] * 3
    data, meta = prepare(tmp_path, folder, records)
    total = meta["splits"]["train"]["truncated"] + meta["splits"]["eval"]["truncated"]
    assert total == 3
    tf = TokenFile(data / "train")
    lengths = np.diff(np.append(tf.doc_starts, tf.n_tokens))
    assert lengths.max() <= L
