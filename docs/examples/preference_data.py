"""Write the small data sets of the DPO and GRPO walkthroughs (docs/finetune.md), additions of one-digit
numbers, into a folder:

  pairs.jsonl    DPO: {"prompt", "chosen", "rejected"}: the right sum against a hedged near miss
  answers.jsonl  SFT: {"prompt", "completion"}: the <answer>...</answer> format, right half of the time
  prompts.jsonl  GRPO: {"prompt", "answer"}: what docs/examples/rewards.py:exact_answer checks

  python docs/examples/preference_data.py data/arith [--n 512]
"""

import argparse
import json
import pathlib
import random


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=512)
    args = p.parse_args()
    rng = random.Random(0)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: (out / f"{name}.jsonl").open("w") for name in ("pairs", "answers", "prompts")}
    for _ in range(args.n):
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        prompt, near = f"{a} plus {b} =", a + b + rng.choice([-2, -1, 1, 2])
        rows = {
            "pairs": {"prompt": prompt, "chosen": f" {a + b}.", "rejected": f" maybe {near}."},
            # The format with an answer that is right half of the time: GRPO then has something to improve.
            "answers": {"prompt": prompt, "completion": f" <answer>{a + b if rng.random() < 0.5 else near}</answer>"},
            "prompts": {"prompt": prompt, "answer": a + b},
        }
        for name, row in rows.items():
            files[name].write(json.dumps(row) + "\n")
    for f in files.values():
        f.close()
    print(f"wrote {args.n} records each to {', '.join(str(out / f'{n}.jsonl') for n in files)}")


if __name__ == "__main__":
    main()
