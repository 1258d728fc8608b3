"""Local lm_eval tasks the eval tests write: a multiple-choice task, a rolling-perplexity task and a
short-answer task, each a YAML with `dataset_path: json` over a JSONL the test writes."""

import json
import pathlib

WORDS = (
    "the cat sat on a mat while two dogs ran past the old red barn and a bird sang in the tall green tree "
    "near the river where fish swim under the bridge every day of the year"
).split()

MC = """task: mc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

PPL = """task: ppl_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

QA = """task: qa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""

TASKS = ("mc_local", "ppl_local", "qa_local")


def _text(rng, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))


def write_tasks(folder: pathlib.Path, docs: int = 6) -> pathlib.Path:
    """The three tasks' YAMLs and data in `folder`. The perplexity texts run past a 64-token context,
    so they are scored in several windows."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    mc = [
        {"question": _text(rng, 6) + " ?", "choices": [" " + _text(rng, k) for k in (1, 2, 3, 1)], "answer": n % 4}
        for n in range(docs)
    ]
    ppl = [{"text": _text(rng, 30 + 25 * n)} for n in range(docs)]
    qa = [{"question": _text(rng, 5), "answer": " " + _text(rng, 1)} for _ in range(docs)]
    for name, rows, template in (("mc", mc, MC), ("ppl", ppl, PPL), ("qa", qa, QA)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}_local.yaml").write_text(template.format(data=data))
    return folder
