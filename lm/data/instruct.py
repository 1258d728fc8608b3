"""Instruction and chat data: JSONL records -> token ids plus a per-token loss mask.

Formats (`data.format`; `auto` decides from the first record):
  text        {"text": ...}                         every token trains, as in pretraining
  completion  {"prompt": ..., "completion": ...}    only the completion and the EOS after it train
  chat        {"messages": [{"role", "content"}]}   only the assistant turns train (system turns allowed)

Chats are rendered with the tokenizer's chat template (lm.data.tokenizer: its own, or the documented
default). Which tokens belong to assistant turns is found as transformers' `return_assistant_tokens_mask`
intends, but without template markup: the conversation is rendered prefix by prefix, and each assistant
turn is the text between `render(messages[:i], add_generation_prompt=True)` and
`render(messages[:i + 1])`. The text is encoded piece by piece at those boundaries, so every token is
either wholly inside or wholly outside an assistant turn. With the default template (which has no
end-of-turn token) each assistant turn is followed by the EOS id, trained, so the model learns to stop.

Truncation rule for an example longer than `seq_len` tokens: tokens are dropped from the left (the
oldest context) but never past the first trained token, so the prompt's tail and the completion's
head are kept; whatever still does not fit is cut at the right. The count is reported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator

from lm.data.corpus import jsonl_lines
from lm.data.tokenizer import DEFAULT_CHAT_TEMPLATE
from lm.errors import UserError

FORMATS = ("auto", "text", "completion", "chat")


@dataclasses.dataclass(frozen=True)
class Example:
    """ids: the example's tokens, EOS included; mask[j] = 1 where token j is a training target."""

    ids: list[int]
    mask: list[int]

    def __post_init__(self):
        assert len(self.ids) == len(self.mask)


def record_format(record: dict, where: str) -> str:
    """The format of one JSONL record, from its fields."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object; each line needs 'text', 'prompt'/'completion' or 'messages'")
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    raise UserError(
        f"{where} has none of the fields 'text', 'prompt'/'completion' or 'messages' (has {sorted(record)})"
    )


def encode_record(record: dict, fmt: str, tokenizer, where: str = "record") -> Example:
    fmt = record_format(record, where) if fmt == "auto" else fmt
    if fmt == "chat":
        return encode_chat(_messages(record, where), tokenizer)
    if fmt == "completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise UserError(
                f"{where} needs string 'prompt' and non-empty 'completion' fields for data.format=completion"
            )
        # The prompt as generate and score encode it (the tokenizer's own BOS rule), so that training
        # and inference see the same tokens.
        p, c = tokenizer.encode(prompt), _encode(tokenizer, completion) + [tokenizer.eos_id]
        return Example(p + c, [0] * len(p) + [1] * len(c))
    text = record.get("text")
    if not isinstance(text, str):
        raise UserError(f"{where} has no string 'text' field for data.format=text")
    ids = tokenizer.encode(text)
    ids += [tokenizer.eos_id] if ids[-1:] != [tokenizer.eos_id] else []
    return Example(ids, [1] * len(ids))


def _messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where} has no assistant turn, so nothing to train on; drop it or add the reply")
    return messages


def _encode(tokenizer, text: str) -> list[int]:
    """The text's own tokens, no BOS: for a completion after its prompt, and for chat text, whose
    template writes its own BOS (as transformers assumes)."""
    return tokenizer.encode(text, add_bos=False)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans [start, end) of its assistant turns)."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole "
                "(it rewrites earlier turns), so assistant tokens cannot be located; use another template"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_chat(messages: list[dict], tokenizer) -> Example:
    full, spans = assistant_spans(messages, tokenizer)
    # The documented default template has no end-of-turn token: add the EOS after each reply ourselves.
    default = getattr(tokenizer, "chat_template", None) in (None, DEFAULT_CHAT_TEMPLATE)
    ids, mask, at, reply = [], [], 0, []
    for start, end in spans:
        piece = _encode(tokenizer, full[at:start])
        ids += piece
        mask += [0] * len(piece)
        reply = _encode(tokenizer, full[start:end]) + ([tokenizer.eos_id] if default else [])
        ids += reply
        mask += [1] * len(reply)
        at = end
    tail = _encode(tokenizer, full[at:])
    ids += tail
    mask += [0] * len(tail)
    if ids[-1] != tokenizer.eos_id:  # every example ends with EOS: the pipeline's document separator
        # After a final reply whose template wrote no token that generate stops at, this EOS is how
        # the model learns to stop, so it trains; after an end-of-turn stop token it only separates.
        stops = set(getattr(tokenizer, "stop_ids", ()) or (tokenizer.eos_id,))
        ids.append(tokenizer.eos_id)
        mask.append(int(messages[-1]["role"] == "assistant" and not stops & set(reply)))
    return Example(ids, mask)


def truncate(example: Example, seq_len: int) -> tuple[Example, bool]:
    """Fit an example into seq_len tokens by the module's rule; (example, whether it was cut)."""
    n = len(example.ids)
    if n <= seq_len:
        return example, False
    first = next((j for j, m in enumerate(example.mask) if m), n)
    left = min(n - seq_len, first)
    ids, mask = example.ids[left : left + seq_len], example.mask[left : left + seq_len]
    return Example(ids, mask), True


@dataclasses.dataclass
class Stats:
    examples: int = 0
    truncated: int = 0
    trained_tokens: int = 0
    formats: dict = dataclasses.field(default_factory=dict)


def encode_records(
    records: Iterable[tuple[str, dict]], fmt: str, tokenizer, seq_len: int, stats: Stats
) -> Iterator[Example]:
    """Encode (where, record) pairs, truncating each to seq_len; counts go into `stats`."""
    for where, record in records:
        kind = record_format(record, where) if fmt == "auto" else fmt
        example, cut = truncate(encode_record(record, kind, tokenizer, where), seq_len)
        stats.examples += 1
        stats.truncated += cut
        stats.trained_tokens += sum(example.mask)
        stats.formats[kind] = stats.formats.get(kind, 0) + 1
        yield example


def first_record_format(path) -> str | None:
    """The format of a JSONL file's first record (None for an empty file)."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{number} is not valid JSON") from None
                # Anything but chat or prompt/completion is text, read from data.text_field.
                if isinstance(record, dict) and ("messages" in record or "prompt" in record or "completion" in record):
                    return record_format(record, f"{path}:{number}")
                return "text"
    return None


def iter_records(files) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of JSONL files."""
    from pathlib import Path

    for path in map(Path, files):
        for lineno, line in jsonl_lines(path):
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e.msg}); each line must be one JSON object") from None
