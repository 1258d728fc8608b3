"""Write a small chat dataset for the fine-tuning walkthrough (docs/finetune.md): arithmetic questions
with one-line answers, some with a system turn, as JSONL `{"messages": [{"role", "content"}, ...]}`.

  python docs/examples/chat_data.py data/chat.jsonl [--n 2000]
"""

import argparse
import json
import pathlib
import random


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    rng = random.Random(0)
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i in range(args.n):
            a, b, op = rng.randint(0, 12), rng.randint(0, 12), rng.choice(sorted(ops))
            system = [{"role": "system", "content": "You are a calculator. Answer in one line."}]
            messages = system if i % 4 == 0 else []
            messages += [
                {"role": "user", "content": f"What is {a} {op} {b}?"},
                {"role": "assistant", "content": f"{a} {op} {b} is {ops[op](a, b)}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    print(f"wrote {args.n} conversations to {out}")


if __name__ == "__main__":
    main()
