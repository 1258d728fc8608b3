"""Preference pairs (DPO), prompts (GRPO) and reward functions, as TRL 1.16 reads them.

DPO records: `{"prompt", "chosen", "rejected"}`, each a string or, in TRL's conversational format, a
list of `{"role", "content"}` messages (the prompt's turns; chosen and rejected hold the reply). A
record without `prompt` whose chosen and rejected are whole conversations takes their shared leading
turns as the prompt (TRL's `extract_prompt`). Tokenised as TRL's DPOTrainer does: strings with the
tokenizer's own rule (BOS where AutoTokenizer adds one) and the EOS after each completion;
conversations rendered with the chat template, the prompt with the generation prompt. The completion
starts where the tokenised prompt and prompt + completion first differ, so a token that merges across
the boundary belongs to the completion. Only completion tokens carry loss weight.

GRPO records: `{"prompt": ...}` (string or messages) or `{"messages": [...]}` ending in a user turn;
every other field is handed to the reward functions, one list entry per completion, as TRL does.

Reward functions are named "FILE.py:FUNCTION" and called as TRL calls them:
`fn(prompts=[...], completions=[...], completion_ids=[...], **fields) -> list[float | None]`. For
conversational prompts each completion is `[{"role": "assistant", "content": text}]`. None means
"cannot score" (NaN); the weighted rewards are summed ignoring NaNs, and a completion that no
function could score gets reward NaN (its advantage is then 0).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import sys
from collections.abc import Callable, Sequence

import numpy as np

from lm.data.instruct import Example, iter_records, truncate
from lm.data.tokenizer import DEFAULT_CHAT_TEMPLATE
from lm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference pair as token ids: the shared prompt and the two completions (EOS included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def examples(self, seq_len: int) -> tuple[Example, Example]:
        """prompt + chosen and prompt + rejected, masked to their completions, each cut to seq_len
        tokens by lm.data.instruct's rule (the prompt's head goes first)."""
        out = []
        for completion in (self.chosen, self.rejected):
            example = Example(self.prompt + completion, [0] * len(self.prompt) + [1] * len(completion))
            out.append(truncate(example, seq_len)[0])
        return out[0], out[1]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One GRPO prompt: its token ids, the prompt as written (what reward functions get) and the
    record's other fields."""

    ids: list[int]
    prompt: str | list[dict]
    fields: dict

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ends_turns_with_eos(tokenizer) -> bool:
    """The documented default template has no end-of-turn token; replies then end with the EOS id
    (as lm.data.instruct's chat data does)."""
    return getattr(tokenizer, "chat_template", None) in (None, DEFAULT_CHAT_TEMPLATE)


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return tokenizer.encode(text, add_bos=False)  # templates write their own BOS


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids[-1:] == [eos_id] else ids + [eos_id]


def encode_pair(record: dict, tokenizer, where: str = "record") -> Pair:
    """A DPO record as token ids (see the module docstring for the rules)."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object; each line needs 'prompt', 'chosen' and 'rejected'")
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    if prompt is None and _is_messages(chosen) and _is_messages(rejected):
        n = _common_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        if not chosen or not rejected:
            raise UserError(f"{where} has an empty 'chosen' or 'rejected'; both completions need text")
        p = tokenizer.encode(prompt)
        pc = _with_eos(tokenizer.encode(prompt + chosen), tokenizer.eos_id)
        pr = _with_eos(tokenizer.encode(prompt + rejected), tokenizer.eos_id)
    elif all(_is_messages(x) for x in (prompt, chosen, rejected)):
        p = _render(tokenizer, prompt, generation_prompt=True)
        pc = _render(tokenizer, prompt + chosen, generation_prompt=False)
        pr = _render(tokenizer, prompt + rejected, generation_prompt=False)
        if _ends_turns_with_eos(tokenizer):
            pc, pr = _with_eos(pc, tokenizer.eos_id), _with_eos(pr, tokenizer.eos_id)
    else:
        raise UserError(
            f"{where} needs 'prompt', 'chosen' and 'rejected' all strings or all lists of "
            "{'role': str, 'content': str} messages (TRL's preference format)"
        )
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    if n == len(pc) or n == len(pr):
        raise UserError(f"{where}: a completion adds no tokens to the prompt; nothing to compare")
    return Pair(p[:n], pc[n:], pr[n:])


def pair_batch(pairs: Sequence[Pair], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """A DPO batch [2 * pairs, seq_len]: the chosen sequences first, then the rejected (TRL's layout).

    tokens/targets/positions/segment_ids/weights as the train step takes them; weights mark the
    targets that are completion tokens; padding has segment id 0 and weight 0."""
    examples = [e for pair in pairs for e in pair.examples(seq_len + 1)]
    examples = examples[0::2] + examples[1::2]
    return _pack(examples, seq_len, pad_id)


def completion_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """A GRPO batch [completions, seq_len]: each prompt followed by its sampled completion, the
    completion's tokens (through its EOS, none after) weighted 1."""
    examples = [Example(list(p) + list(c), [0] * len(p) + [1] * len(c)) for p, c in zip(prompts, completions)]
    return _pack(examples, seq_len, pad_id)


def _pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    rows = len(examples)
    out = {
        "tokens": np.full((rows, seq_len), pad_id, np.int32),
        "targets": np.full((rows, seq_len), pad_id, np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "weights": np.zeros((rows, seq_len), np.float32),
    }
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        if n > seq_len:
            raise ValueError(f"example of {n + 1} tokens does not fit seq_len={seq_len} + 1")
        out["tokens"][i, :n] = e.ids[:-1]
        out["targets"][i, :n] = e.ids[1:]
        out["segment_ids"][i, :n] = 1
        out["weights"][i, :n] = e.mask[1:]
    return out


def encode_prompt(record: dict, tokenizer, where: str = "record") -> Prompt:
    """A GRPO record as the prompt's token ids, the prompt as written and the other fields."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object; each line needs 'prompt' or 'messages'")
    key = "prompt" if "prompt" in record else "messages"
    prompt = record.get(key)
    fields = {k: v for k, v in record.items() if k != key}
    if isinstance(prompt, str) and prompt:
        return Prompt(tokenizer.encode(prompt), prompt, fields)
    if _is_messages(prompt):
        if prompt[-1]["role"] == "assistant":
            raise UserError(
                f"{where}: the prompt ends with an assistant turn; GRPO prompts end with the turn the model "
                "answers (keep a reference answer in another field for the reward function)"
            )
        return Prompt(_render(tokenizer, prompt, generation_prompt=True), prompt, fields)
    raise UserError(
        f"{where} needs a non-empty string 'prompt', or 'prompt'/'messages' as a list of "
        "{'role': str, 'content': str} messages"
    )


def read_pairs(files: Sequence, tokenizer) -> list[Pair]:
    """Every DPO record of the JSONL files, in order."""
    pairs = [encode_pair(record, tokenizer, where) for where, record in iter_records(files)]
    if not pairs:
        raise UserError(f"no preference records in {[str(f) for f in files]}; each line needs prompt/chosen/rejected")
    return pairs


def read_prompts(files: Sequence, tokenizer) -> list[Prompt]:
    """Every GRPO prompt record of the JSONL files, in order."""
    prompts = [encode_prompt(record, tokenizer, where) for where, record in iter_records(files)]
    if not prompts:
        raise UserError(f"no prompt records in {[str(f) for f in files]}; each line needs 'prompt' or 'messages'")
    return prompts


class RecordStream:
    """Endless process-local batches of records (DPO pairs, GRPO prompts), reshuffled every epoch from
    (seed, epoch). Its state is the number of batches taken: the checkpoint keeps it (as grain's
    iterators are kept), so a resumed run continues the same sequence bit for bit."""

    def __init__(self, records: Sequence, batch_size: int, seed: int, make: Callable = list, index=0, count=1):
        self.records, self.batch_size, self.seed, self.make = list(records), batch_size, seed, make
        self.rows = slice(index * batch_size // count, (index + 1) * batch_size // count)  # this process's rows
        self.taken = 0

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.records))

    def __next__(self):
        n, first = len(self.records), self.taken * self.batch_size
        positions = range(first, first + self.batch_size)[self.rows]
        orders = {e: self._order(e) for e in {p // n for p in positions}}
        self.taken += 1
        return self.make([self.records[orders[p // n][p % n]] for p in positions])

    def get_state(self) -> bytes:
        return json.dumps({"batches_taken": self.taken}).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        self.taken = int((state if isinstance(state, dict) else json.loads(state))["batches_taken"])

    def start_prefetch(self) -> None:
        """grain's checkpoint handler calls this after a restore; batches are made on demand."""


# ------------------------------------------------------------------------------------------------
# Reward functions


@dataclasses.dataclass(frozen=True)
class Rewards:
    """Reward functions with their names ("FILE.py:FUNCTION") and weights."""

    functions: tuple[Callable, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]

    def score(
        self, prompts: Sequence[Prompt], completions: Sequence[str], completion_ids: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(total [n], per function [n, functions]) for n completions, prompts[i] being completion i's
        prompt (repeated over its group). NaN where a function returned None; the total sums the
        weighted rewards ignoring NaNs and is NaN where every function returned None."""
        n = len(completions)
        conversational = bool(prompts) and prompts[0].conversational
        texts = [p.prompt for p in prompts]
        given = [[{"role": "assistant", "content": c}] for c in completions] if conversational else list(completions)
        keys = list(prompts[0].fields) if prompts else []
        fields = {k: [p.fields.get(k) for p in prompts] for k in keys}
        per = np.full((n, len(self.functions)), np.nan, np.float32)
        for j, (fn, name) in enumerate(zip(self.functions, self.names)):
            try:
                out = fn(prompts=texts, completions=given, completion_ids=[list(c) for c in completion_ids], **fields)
            except TypeError as e:  # most often a signature that takes no **kwargs
                raise UserError(
                    f"reward {name} cannot be called as TRL calls reward functions ({e}); give it **kwargs"
                ) from None
            out = list(out) if out is not None else []
            if len(out) != n:
                raise UserError(
                    f"reward {name} returned {len(out)} rewards for {n} completions; return one per completion"
                )
            for i, r in enumerate(out):
                if r is None:
                    continue
                try:
                    per[i, j] = float(r)
                except (TypeError, ValueError):
                    raise UserError(f"reward {name} returned {r!r}; each reward must be a number or None") from None
        weighted = per * np.asarray(self.weights, np.float32)[None, :]
        total = np.where(np.isnan(per).all(axis=1), np.nan, np.nansum(weighted, axis=1)).astype(np.float32)
        return total, per


def load_rewards(specs: Sequence[str], weights: Sequence[float] = (), base: str | pathlib.Path = ".") -> Rewards:
    """Import each "FILE.py:FUNCTION" (FILE relative to `base` unless absolute)."""
    if not specs:
        raise UserError('objective.rewards is empty; name at least one "FILE.py:FUNCTION"')
    if weights and len(weights) != len(specs):
        raise UserError(f"objective.reward_weights has {len(weights)} entries for {len(specs)} rewards")
    functions = []
    for spec in specs:
        file, sep, name = str(spec).rpartition(":")
        if not sep or not file.endswith(".py") or not name.isidentifier():
            raise UserError(f'objective.rewards entry {spec!r} must look like "FILE.py:FUNCTION"')
        path = pathlib.Path(file).expanduser()
        path = path if path.is_absolute() else pathlib.Path(base) / path
        if not path.is_file():
            raise UserError(f"objective.rewards: {path} does not exist; give the reward file's path")
        module_name = f"_nnx_lm_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error it raises is bad input
            del sys.modules[module_name]
            raise UserError(f"objective.rewards: importing {path} failed: {type(e).__name__}: {e}") from None
        fn = getattr(module, name, None)
        if not callable(fn):
            defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise UserError(f"objective.rewards: {path} defines no function {name!r} (it defines {defined})")
        functions.append(fn)
    weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(specs)
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"objective.reward_weights={list(weights)} must be finite numbers")
    return Rewards(tuple(functions), tuple(str(s) for s in specs), weights)
