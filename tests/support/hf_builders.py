"""Hugging Face folders the tests build themselves: tokenizers trained here, tiny random transformers models."""

import io
import json
import pathlib

import transformers

from lm.data.tokenizer import HF_TOKENIZER_FILES

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


def spm_folder(out: pathlib.Path, user_symbols: tuple[str, ...] = ()) -> pathlib.Path:
    """A Llama 2 style sentencepiece BPE (dummy prefix, byte fallback) saved as an HF tokenizer.model;
    user_symbols become pieces of their own (Gemma's <start_of_turn> and <end_of_turn> are such)."""
    import sentencepiece as spm

    model = io.BytesIO()
    lines = [line for doc in corpus() for line in doc.splitlines(keepends=True)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        user_defined_symbols=list(user_symbols),
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


def tiny_llama(out: pathlib.Path, tokenizer_folder: pathlib.Path | None, *, vocab_size: int = 400, context: int = 64):
    """A random LlamaForCausalLM (GQA 4:2, untied head, perturbed norms) saved with save_pretrained, plus the
    tokenizer files of tokenizer_folder; generation_config.json takes the tokenizer's eos ids."""
    import shutil

    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # transformers starts them at 1: a dropped norm would pass unnoticed
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    if tokenizer_folder is not None:
        for name in (*HF_TOKENIZER_FILES, "generation_config.json"):
            if (tokenizer_folder / name).is_file():
                shutil.copyfile(tokenizer_folder / name, out / name)
    return out
