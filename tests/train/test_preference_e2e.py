"""DPO and GRPO end to end through launch.train on CPU: a tiny random transformers Llama with a BPE
tokenizer the test trains, LoRA adapters; preference pairs and prompts the test writes; a reward the
test defines; resume after SIGKILL bit for bit; bad input as one line."""

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, final_params, run_cli

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
from hf_builders import bpe_folder, tiny_llama  # noqa: E402

REWARD = '''
import re


def answer_is_sum(prompts, completions, a, b, **kwargs):
    """1 where the first <answer>...</answer> holds a + b, else 0."""
    out = []
    for text, x, y in zip(completions, a, b):
        m = re.search(r"<answer>(-?\\\\d+)</answer>", text)
        out.append(1.0 if m and int(m.group(1)) == x + y else 0.0)
    return out
'''


def pair_records(n: int, seed: int = 0) -> list[dict]:
    """The preferred reply says the sum; the rejected one a wrong number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        out.append({"prompt": f"{a} plus {b} is", "chosen": f" {a + b}.", "rejected": f" {wrong} or so."})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    tokenizer = bpe_folder(root / "tok", gpt2=False)
    base = tiny_llama(root / "base", tokenizer, vocab_size=400, context=64)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_records(64)))
    return root, base, pairs


def dpo_args(run_dir, base, pairs, *extra):
    sets = [
        f"init.from={base}",
        f'data.inputs=["{pairs}"]',
        "train.objective=dpo",
        "train.seq_len=32",
        "train.steps=30",
        "train.log_every=5",
        "train.sample_tokens=4",
        "checkpoint.every=10",
        "optimizer.lr=1e-2",
        "optimizer.warmup_steps=2",
        *extra,
    ]
    args = ["launch.train", "--recipe", "finetune_tiny", "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return args


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo_run(setup):
    root, base, pairs = setup
    run = root / "dpo"
    out = run_cli(*dpo_args(run, base, pairs))
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out


def test_dpo_reward_accuracy_rises_and_the_margin_grows(dpo_run):
    run, _ = dpo_run
    logged = [r for r in rows(run) if "reward_accuracy" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    for r in logged:
        assert {"loss", "rewards_chosen", "rewards_rejected", "reward_margin"} <= set(r)
        assert r["reward_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"], abs=1e-5)
    assert logged[-1]["reward_accuracy"] > 0.9
    assert logged[-1]["reward_margin"] > logged[0]["reward_margin"] + 0.5
    assert logged[-1]["loss"] < logged[0]["loss"]


def kill_after(args, run_dir, step_dir: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / step_dir).is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_dpo_run_resumes_bit_for_bit(setup, dpo_run):
    root, base, pairs = setup
    straight, _ = dpo_run
    killed = root / "dpo_killed"
    kill_after(dpo_args(killed, base, pairs), killed, "10")
    assert not (killed / "checkpoints" / "30").exists(), "the run finished before it could be interrupted"
    out = run_cli(*dpo_args(killed, base, pairs))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr + out.stdout
    for x, y in zip(final_params(straight, 30), final_params(killed, 30), strict=True):
        np.testing.assert_array_equal(x, y)
    keys = ("step", "loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")

    def logged(run):
        return [{k: r[k] for k in keys} for r in rows(run) if "reward_margin" in r]

    assert logged(straight) == logged(killed)
