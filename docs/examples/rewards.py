"""Reward functions for GRPO (objective.rewards=["docs/examples/rewards.py:exact_answer", ...]).

Each is called as TRL calls reward functions: keyword arguments `prompts`, `completions` (strings, or
[{"role": "assistant", "content": ...}] for chat prompts), `completion_ids`, and every other field
of the prompt records, one list entry per completion. Return one float per completion, or None where
the function cannot score it.
"""

import re


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def exact_answer(completions, answer, **kwargs) -> list[float | None]:
    """1.0 when <answer>...</answer> holds the record's `answer` field, 0.0 when it holds something
    else, None when there is no answer tag at all."""
    out = []
    for completion, want in zip(completions, answer):
        found = re.search(r"<answer>(.*?)</answer>", _text(completion), re.S)
        out.append(None if found is None else float(found.group(1).strip() == str(want)))
    return out


def tagged(completions, **kwargs) -> list[float]:
    """0.2 for using the answer tag at all: a shaping reward for the format."""
    return [0.2 if re.search(r"<answer>.*?</answer>", _text(c), re.S) else 0.0 for c in completions]
