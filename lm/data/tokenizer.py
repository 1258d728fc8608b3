"""Tokenizers: one interface over our own sentencepiece models and Hugging Face tokenizer folders.

Three formats, one `Tokenizer`:
- our own sentencepiece `.model` (trained by `launch.prepare`, BPE that round-trips source code exactly);
- a Hugging Face folder with `tokenizer.json` (Llama 3, Qwen, GPT-2, ...), run by the `tokenizers` package;
- a Hugging Face folder with only `tokenizer.model` (Llama 2 / Gemma style sentencepiece), run by sentencepiece.

For Hugging Face folders, `transformers.AutoTokenizer` (5.x) is the reference: special tokens come from
`tokenizer_config.json` / `special_tokens_map.json` / `generation_config.json`, BOS is added where its
`tokenizer(text)` adds it, special-token strings in the text become their ids, and chat templates are
rendered with the same sandboxed jinja2 environment.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import sentencepiece as spm

from lm.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# sentencepiece skips training sentences longer than max_sentence_length bytes; cut long lines below it.
_MAX_LINE_CHARS = 8192

# Files that make up a Hugging Face tokenizer (copied verbatim on export, hashed for mismatch checks).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
# What a run imported from a Hugging Face folder keeps besides those: older tokenizer formats and the
# model's generation settings (a chat model's end-of-turn ids travel with its tokenizer).
HF_FOLDER_FILES = HF_TOKENIZER_FILES + ("vocab.json", "merges.txt", "chat_template.json", "generation_config.json")

# Used for chat data when a tokenizer has no template of its own (our sentencepiece models, base models).
# It holds no special tokens, so it encodes with any vocabulary; the fine-tuning data ends each assistant
# turn with the EOS id itself. Rendered, a conversation reads:
#   <|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!\n
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# What transformers' tokenizer classes assume when tokenizer_config.json names no special tokens.
_CLASS_DEFAULTS = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "GemmaTokenizer": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "GPT2Tokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}


@dataclasses.dataclass(frozen=True)
class _Added:
    """A token that is cut out of the text before the model sees it (transformers' AddedToken)."""

    content: str
    id: int
    special: bool
    lstrip: bool = False
    rstrip: bool = False


class Tokenizer:
    """Text <-> ids for a sentencepiece `.model` file, a Hugging Face tokenizer folder or a run directory.

    `encode(text)` adds what the tokenizer's own rule adds: nothing for our sentencepiece models (documents
    are joined with EOS by the data pipeline), and for Hugging Face tokenizers what `AutoTokenizer(text)`
    adds (BOS for Llama and Gemma, nothing for GPT-2 and Qwen). `decode` skips special tokens.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self.chat_template: str | None = None
        self.add_bos = False  # the rule `encode(text)` follows for the BOS
        self._added: list[_Added] = []
        self._special_ids: set[int] = set()
        self._hf_json = None  # a tokenizers.Tokenizer
        self._sp = None
        self._prepend = "never"  # transformers' Metaspace prepend scheme for a sentencepiece HF folder
        self._specials: dict[str, str] = {}  # bos_token, eos_token, ... as strings (chat templates use them)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                self.kind = "tokenizers"
                self._load_hf(path)
            elif (path / "tokenizer.model").is_file() and has_hf_tokenizer(path):
                self.kind = "hf-sentencepiece"
                self._load_hf(path)
            elif (path / "tokenizer.model").is_file():  # a run directory of ours
                self.kind = "sentencepiece"
                self.path = path / "tokenizer.model"
                self._load_own_spm(self.path)
            else:
                raise UserError(
                    f"{path} holds no tokenizer (tokenizer.json or tokenizer.model); pass a Hugging Face model "
                    "folder, a run directory or a sentencepiece .model file"
                )
        elif path.is_file():
            self.kind = "sentencepiece"
            self._load_own_spm(path)
        else:
            raise UserError(
                f"tokenizer {path} does not exist; pass a sentencepiece .model file, a Hugging Face tokenizer "
                f"folder, or run `python -m launch.prepare` to train one"
            )

    # ---- loading -------------------------------------------------------------------------------------

    def _load_own_spm(self, file: Path) -> None:
        self._sp = _load_spm(file)
        self._vocab_size = self._sp.get_piece_size()
        self.bos_id = _or_none(self._sp.bos_id())
        self.eos_id = _or_none(self._sp.eos_id())
        self.pad_id = _or_none(self._sp.pad_id())
        self.stop_ids = (self.eos_id,) if self.eos_id is not None else ()
        self.files = [file]
        named = (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))
        self._specials = {k: self._sp.id_to_piece(i) for k, i in named if i is not None}
        self._specials["unk_token"] = self._sp.id_to_piece(self._sp.unk_id())

    def _load_hf(self, folder: Path) -> None:
        config = _read_json(folder / "tokenizer_config.json")
        specials = {**_CLASS_DEFAULTS.get(str(config.get("tokenizer_class", "")).removesuffix("Fast"), {})}
        specials.update({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config})
        if "added_tokens_decoder" not in config:  # transformers reads the legacy map only then
            legacy = _read_json(folder / "special_tokens_map.json")
            specials.update(
                {k: v for k, v in legacy.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
            )
        specials = {k: _content(v) for k, v in specials.items() if _content(v) is not None}
        self.files = [folder / f for f in HF_TOKENIZER_FILES if (folder / f).is_file()]

        if self.kind == "tokenizers":
            self._load_tokenizer_json(folder, config, specials)
        else:
            self._load_hf_spm(folder, config, specials)

        ids = {k: self.token_to_id(v) for k, v in specials.items()}
        self.bos_id, self.eos_id, self.pad_id = ids.get("bos_token"), ids.get("eos_token"), ids.get("pad_token")
        self._special_ids |= {i for i in ids.values() if i is not None}
        # generate() stops at any of generation_config's eos ids (Llama 3 lists several); config.json is
        # the fallback transformers uses when there is no generation_config.json.
        gen = _read_json(folder / "generation_config.json") or _read_json(folder / "config.json")
        extra = gen.get("eos_token_id")
        extra = [extra] if isinstance(extra, int) else list(extra or [])
        if self.eos_id is None and extra:
            self.eos_id = extra[0]
        self.stop_ids = tuple(dict.fromkeys(([self.eos_id] if self.eos_id is not None else []) + extra))
        if self.pad_id is None and isinstance(gen.get("pad_token_id"), int):
            self.pad_id = gen["pad_token_id"]

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (folder / "chat_template.jinja").is_file():  # the file wins over the config entry, as in transformers
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        self._specials = specials

    def _load_tokenizer_json(self, folder: Path, config: dict, specials: dict) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as JsonTokenizer

        try:
            tok = JsonTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the tokenizers package raises plain Exceptions
            raise UserError(f"{folder / 'tokenizer.json'} is not a tokenizers file ({str(e)[:120]})") from None
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        if _class_name(config) == "LlamaTokenizer" and not _byte_level(folder / "tokenizer.json"):
            _as_llama_tokenizer(tok, config)
        # transformers registers the named special tokens as added tokens when tokenizer.json lacks them.
        present = {t.content for t in tok.get_added_tokens_decoder().values()}
        missing = [v for v in specials.values() if v not in present and tok.token_to_id(v) is not None]
        if missing:
            tok.add_special_tokens([AddedToken(v, special=True, normalized=False) for v in missing])
        # add_bos_token/add_eos_token in tokenizer_config.json are ignored next to a tokenizer.json (transformers
        # drops them): its post-processor alone decides, and without one nothing is added.
        self._hf_json = tok
        self._vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab().values()) + 1)
        self._special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        probe = tok.encode("", add_special_tokens=True).ids
        bos = specials.get("bos_token")
        self.add_bos = bool(probe) and bos is not None and probe[0] == tok.token_to_id(bos)

    def _load_hf_spm(self, folder: Path, config: dict, specials: dict) -> None:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        try:
            proto.ParseFromString((folder / "tokenizer.model").read_bytes())
        except Exception:  # noqa: BLE001 - protobuf's DecodeError
            raise UserError(f"{folder / 'tokenizer.model'} is not a sentencepiece model") from None
        # transformers (5.x) turns the .model into a `tokenizers` BPE with no normalizer and a Metaspace
        # pre-tokenizer, so: no whitespace collapsing, and its own rule for the leading "▁" (below).
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._vocab_size = self._sp.get_piece_size()
        self._prepend = _prepend_scheme(config)
        if _class_name(config).startswith("Gemma"):  # GemmaTokenizer adds no "▁" prefix
            self._prepend = "never"
        # Control (3), unknown (2) and user-defined (4) pieces are added tokens; only the first two are special.
        added = {
            p.piece: _Added(p.piece, i, special=p.type in (2, 3))
            for i, p in enumerate(proto.pieces)
            if p.type in (2, 3, 4)
        }
        size = self._sp.get_piece_size()
        for index, entry in (config.get("added_tokens_decoder") or {}).items():
            token = _Added(
                entry["content"],
                int(index),
                bool(entry.get("special", True)),
                entry.get("lstrip", False),
                entry.get("rstrip", False),
            )
            if token.id >= size or self._sp.id_to_piece(token.id) != token.content:
                raise UserError(
                    f"{folder / 'tokenizer_config.json'} adds token {token.content!r} as id {token.id}, which is not "
                    f"that piece of tokenizer.model (size {size}); add a tokenizer.json for tokens beyond the model"
                )
            added[token.content] = token
        for name in specials.values():
            if name in added:
                added[name] = dataclasses.replace(added[name], special=True)
        self._special_ids = {t.id for t in added.values() if t.special}
        if config.get("split_special_tokens"):  # special-token strings in the text stay text
            added = {k: t for k, t in added.items() if not t.special}
        self._added = sorted(added.values(), key=lambda t: -len(t.content))
        self.add_bos = bool(config.get("add_bos_token", False)) and "bos_token" in specials
        self._add_eos = bool(config.get("add_eos_token", False)) and "eos_token" in specials

    # ---- the interface -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids run from 0 to vocab_size - 1 (added tokens included)."""
        if self._hf_json is not None:
            return max(
                self._hf_json.get_vocab_size(with_added_tokens=True), max(self._hf_json.get_vocab().values()) + 1
            )
        return self._sp.get_piece_size()

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. add_bos None follows the tokenizer's rule (see the class docstring);
        False gives the text's own tokens only; True also puts the BOS first (when there is one)."""
        if self.kind == "sentencepiece":
            ids = self._sp.encode(text)
            return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids
        if self.kind == "tokenizers":
            ids = self._hf_json.encode(text, add_special_tokens=add_bos is not False).ids
        else:
            ids = self._encode_hf_spm(text)
            if add_bos is not False:
                ids = [self.bos_id] * self.add_bos + ids + [self.eos_id] * self._add_eos
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def _encode_hf_spm(self, text: str) -> list[int]:
        """Cut out added tokens, then sentencepiece on each piece of text between them, as transformers does."""
        ids: list[int] = []
        pieces = _split_added(text, self._added)
        for n, piece in enumerate(pieces):
            if isinstance(piece, _Added):
                ids.append(piece.id)
                continue
            first = n == 0
            if self._prepend == "always" or (self._prepend == "first" and first):
                if not piece.startswith(" "):  # Metaspace adds the "▁" only where there is none
                    piece = " " + piece
            ids.extend(self._sp.encode(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens (BOS, EOS, pad, ...) left out."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        if self.kind == "tokenizers":
            return self._hf_json.decode(ids, skip_special_tokens=True)
        # transformers' decoder for these: "▁" -> " ", runs of <0xNN> bytes -> UTF-8 (a run that is not
        # valid UTF-8 gives one U+FFFD per byte), joined, then one leading space stripped.
        pieces, run = [], bytearray()
        for i in ids:
            if i in self._special_ids:
                continue
            piece = self._sp.id_to_piece(i)
            if self._sp.is_byte(i):
                run.append(int(piece[3:5], 16))
                continue
            if run:
                pieces.append(_utf8_or_replacement(run))
                run = bytearray()
            pieces.append(piece.replace("▁", " "))
        if run:
            pieces.append(_utf8_or_replacement(run))
        out = "".join(pieces)
        if self._prepend != "never" and out.startswith(" "):
            out = out[1:]
        return out

    def token_to_id(self, token: str) -> int | None:
        if self._hf_json is not None:
            return self._hf_json.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_piece(self, token_id: int) -> str:
        if self._hf_json is not None:
            return self._hf_json.id_to_token(int(token_id))
        return self._sp.id_to_piece(int(token_id))

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        *,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs,
    ) -> str:
        """The conversation as text, rendered like transformers' `apply_chat_template(..., tokenize=False)`.

        Uses the tokenizer's own template, else DEFAULT_CHAT_TEMPLATE. Encode the result with
        `encode(text, add_bos=False)`: templates write their own BOS, as transformers assumes.
        """
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise UserError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
        template = chat_template or self.chat_template or DEFAULT_CHAT_TEMPLATE
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        import jinja2

        try:
            return _compile_chat_template(template).render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self._specials, **kwargs},
            )
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the chat template refused this conversation: {e}") from None

    @property
    def sha256(self) -> str:
        """A content hash for mismatch checks: the .model file's sha256 for our own tokenizers (what
        checkpoints store as `tokenizer_sha256`), else over the tokenizer files' names and bytes."""
        if self.kind == "sentencepiece":
            return file_sha256(self.path)
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        return digest.hexdigest()

    def save_pretrained(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write files that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads into a tokenizer
        with this one's encode, decode and special tokens. Returns the files written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.kind != "sentencepiece":
            # generation_config.json goes along: a chat model's end-of-turn ids are its stop ids.
            generation = self.path / "generation_config.json"
            written = []
            for f in self.files + ([generation] if generation.is_file() else []):
                if f.resolve() != (out / f.name).resolve():
                    shutil.copyfile(f, out / f.name)
                written.append(out / f.name)
            return written
        # Our models: the .model plus a config that makes transformers' LlamaTokenizer (a BPE built from
        # the .model) encode like sentencepiece does here: no "▁" prefix, no BOS, and special-token
        # strings in the text kept as text, since our encode never turns them into ids.
        shutil.copyfile(self.path, out / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "legacy": False,
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": self.chat_template or DEFAULT_CHAT_TEMPLATE,
        }
        config.update(self._specials)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return [out / "tokenizer.model", out / "tokenizer_config.json"]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, {self.kind}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `.model` file, a Hugging Face folder (tokenizer.json / tokenizer.model) or a run directory."""
    return Tokenizer(path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str) -> None:
    """Refuse a tokenizer whose ids the model cannot embed."""
    if tokenizer.vocab_size > model_vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model in {where} has "
            f"vocab_size={model_vocab_size}; use the tokenizer the model was trained with"
        )


# ---- helpers -----------------------------------------------------------------------------------------


def _class_name(config: dict) -> str:
    return str(config.get("tokenizer_class") or "").removesuffix("Fast")


def _byte_level(tokenizer_json: Path) -> bool:
    """transformers' test for a Llama 3 style file declared as LlamaTokenizer (then used as it is)."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    return "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])


def _as_llama_tokenizer(tok, config: dict) -> None:
    """What transformers' LlamaTokenizer keeps of a sentencepiece-style tokenizer.json: the vocabulary, merges,
    added tokens and post-processor. Its own normalizer (none), Metaspace pre-tokenizer and decoder replace
    the file's (Llama 2's Prepend("▁") normalizer, say, which also prefixes text after a special token)."""
    from tokenizers import decoders, pre_tokenizers

    scheme = _prepend_scheme(config)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] * (scheme != "never"))


def _prepend_scheme(config: dict) -> str:
    """transformers' `_get_prepend_scheme`: where Metaspace puts the "▁" that stands for a leading space."""
    add_prefix_space = config.get("add_prefix_space")
    if add_prefix_space is not None and not add_prefix_space:
        return "never"
    return "always" if config.get("legacy", False) else "first"


def has_hf_tokenizer(folder: Path) -> bool:
    """Whether a folder's tokenizer is a Hugging Face one (tokenizer.json, or a tokenizer.model with
    its config), not one of our own sentencepiece models."""
    configs = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    return any((folder / f).is_file() for f in configs)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file from the model's source") from None
    return data if isinstance(data, dict) else {}


def _content(value) -> str | None:
    """A special token as stored in the configs: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _utf8_or_replacement(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def _or_none(i: int) -> int | None:
    return None if i < 0 else i


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_spm(file: Path):
    try:
        return spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{file} is not a sentencepiece model ({e}); pass a .model file") from None


def _split_added(text: str, added: list[_Added]) -> list[str | _Added]:
    """Text and added tokens in order, longest token first, honouring lstrip/rstrip; no empty strings."""
    if not added:
        return [text] if text else []
    by_content = {t.content: t for t in added}
    pattern = re.compile("|".join(re.escape(t.content) for t in added))
    out: list[str | _Added] = []
    pos = 0
    strip_next = False
    for m in pattern.finditer(text):
        token = by_content[m.group()]
        before = text[pos : m.start()]
        if strip_next:
            before = before.lstrip()
        if token.lstrip:
            before = before.rstrip()
        if before:
            out.append(before)
        out.append(token)
        pos, strip_next = m.end(), token.rstrip
    rest = text[pos:]
    if strip_next:
        rest = rest.lstrip()
    if rest:
        out.append(rest)
    return out


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """transformers' `_compile_jinja_template`: a sandbox, trim/lstrip blocks, its globals and tojson."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for masks; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def _training_lines(documents: Iterable[str], counter: list[int]) -> Iterator[str]:
    """Lines with their '\\n' kept, so the model learns newlines and indentation as they appear."""
    for doc in documents:
        for line in doc.splitlines(keepends=True):
            for start in range(0, len(line), _MAX_LINE_CHARS):
                counter[0] += 1
                yield line[start : start + _MAX_LINE_CHARS]


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, out_path: str | os.PathLike, *, seed: int = 0
) -> Tokenizer:
    """Train BPE on `documents` and write `out_path` (written whole, via a temporary name)."""
    out_path = Path(out_path)
    model = io.BytesIO()
    n_lines = [0]
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents, n_lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            # Identity normalization, kept whitespace and no dummy prefix make decode(encode(s)) == s.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            byte_fallback=True,  # any character, seen in training or not, encodes as bytes, never <unk>
            split_digits=True,
            character_coverage=0.9995,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            max_sentence_length=4 * _MAX_LINE_CHARS,
            input_sentence_size=2_000_000,  # a sample keeps training ~10 s however large the corpus
            shuffle_input_sentence=True,
            num_threads=max(1, min(os.cpu_count() or 1, 16)),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(str(e), vocab_size, n_lines[0]) from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)


def _training_error(message: str, vocab_size: int, n_lines: int) -> UserError:
    if n_lines == 0:
        return UserError("corpus for the tokenizer is empty; check --input and --text-field")
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
        return UserError(
            f"vocab_size={vocab_size} is too large for this corpus (it supports at most {m.group(2)}); "
            f"use a smaller --vocab-size or more text"
        )
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        return UserError(
            f"vocab_size={vocab_size} is too small: the bytes, special tokens and common characters "
            f"need {m.group(2)}; use --vocab-size {int(m.group(2)) + 64} or more"
        )
    return UserError(f"tokenizer training failed with vocab_size={vocab_size}: {message.splitlines()[0]}")
