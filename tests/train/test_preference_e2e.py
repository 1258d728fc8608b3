"""DPO and GRPO end to end through launch.train on CPU: a tiny random transformers Llama with a BPE
tokenizer the test trains, LoRA adapters; preference pairs and prompts the test writes; a reward the
test defines; resume after SIGKILL and SIGTERM bit for bit; a full fine-tune's reference; bad input as
one line."""

import json
import random
import shutil
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
        m = re.search(r"<answer>(-?\\d+)</answer>", text)
        out.append(1.0 if m and int(m.group(1)) == x + y else 0.0)
    return out


def formatted(prompts, completions, **kwargs):
    """0.2 for a completion that is exactly <answer>N</answer>: partial credit for the format."""
    return [0.2 if re.fullmatch(r"\\s*<answer>-?\\d+</answer>\\s*", text) else 0.0 for text in completions]


def digits(prompts, completions, **kwargs):
    """The share of digits: a dense reward, so that even a random model's groups differ."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]
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
    prompts = root / "prompts.jsonl"
    rng = random.Random(1)
    with prompts.open("w") as f:
        for _ in range(32):
            a, b = rng.randint(1, 3), rng.randint(1, 3)
            f.write(json.dumps({"prompt": f"{a} plus {b} =", "a": a, "b": b}) + "\n")
    (root / "reward.py").write_text(REWARD)
    with (root / "answers.jsonl").open("w") as f:  # the format, with the sum right half of the time
        for _ in range(512):
            a, b = rng.randint(1, 3), rng.randint(1, 3)
            answer = a + b if rng.random() < 0.5 else a + b + rng.choice([-2, -1, 1, 2])
            f.write(json.dumps({"prompt": f"{a} plus {b} =", "completion": f" <answer>{answer}</answer>"}) + "\n")
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


FULL = ("lora.rank=0", "optimizer.lr=1e-3", "train.steps=30", "train.log_every=1", "checkpoint.every=100")
DPO_KEYS = ("step", "loss", "grad_norm", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def test_full_fine_tune_dpo_sigterm_resumes_and_a_reference_folder_equals_base(setup):
    """DPO without LoRA: reference=base is a frozen copy of the starting weights. A SIGTERM mid-run saves
    a checkpoint and exits 0; the resumed run (whose reference must again be the starting weights, not
    the restored ones) ends bit for bit where a run whose objective.reference names the base folder does."""
    from eval_tasks import write_tasks

    root, base, pairs = setup
    folder_run, stopped_run = root / "dpo_full_folder", root / "dpo_full_sigterm"
    # The folder run also scores an lm_eval task on the live model at its last step (train.eval_tasks).
    tasks = write_tasks(root / "tasks")
    evals = ('train.eval_tasks=["mc_local"]', "train.eval_tasks_every=30", "train.eval_tasks_limit=4")
    offline = {"HF_DATASETS_CACHE": str(root / "datasets"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = dpo_args(folder_run, base, pairs, *FULL, f"objective.reference={base}", *evals)
    out = run_cli(*args, "--set", f"train.eval_include_path={tasks}", env=offline)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "adapter parameters" not in out.stdout + out.stderr
    assert [r["step"] for r in rows(folder_run) if "eval/mc_local/acc" in r] == [30]

    proc = subprocess.Popen(
        [sys.executable, "-m", *dpo_args(stopped_run, base, pairs, *FULL)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (stopped_run / "metrics.jsonl").exists() and any(r.get("step", 0) >= 3 for r in rows(stopped_run)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    stopped = int(output.split("preempted: saved checkpoint ")[1].split()[0])
    assert 3 <= stopped < 30, stopped
    out = run_cli(*dpo_args(stopped_run, base, pairs, *FULL))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"at step {stopped}" in out.stdout + out.stderr

    def logged(run):
        return [{k: r[k] for k in DPO_KEYS} for r in rows(run) if "reward_margin" in r]

    assert logged(folder_run) == logged(stopped_run) and len(logged(folder_run)) == 30
    assert logged(folder_run)[-1]["reward_margin"] > 0  # the policy moved off its reference
    for x, y in zip(final_params(folder_run, 30), final_params(stopped_run, 30), strict=True):
        np.testing.assert_array_equal(x, y)


def grpo_args(run_dir, root, base, *extra):
    sets = [
        f"init.from={base}",
        f'data.inputs=["{root / "prompts.jsonl"}"]',
        "train.objective=grpo",
        f'objective.rewards=["{root / "reward.py"}:answer_is_sum", "{root / "reward.py"}:digits"]',
        "objective.reward_weights=[1.0, 0.5]",
        "objective.group_size=4",
        "objective.max_new_tokens=8",
        "objective.iterations=2",
        "objective.beta=0.04",
        "train.batch_size=16",
        "train.seq_len=24",
        "train.steps=8",
        "train.log_every=2",
        "train.sample_tokens=4",
        "checkpoint.every=4",
        "optimizer.lr=1e-2",
        *extra,
    ]
    args = ["launch.train", "--recipe", "finetune_tiny", "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return args


GRPO_KEYS = ("step", "loss", "reward_mean", "reward_std", "kl", "completion_length", "clip_fraction")


def test_grpo_logs_its_metrics_and_a_killed_run_resumes_bit_for_bit(setup):
    root, base, _ = setup
    straight, killed = root / "grpo", root / "grpo_killed"
    out = run_cli(*grpo_args(straight, root, base))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sample (reward" in out.stdout + out.stderr  # a few completions are shown
    logged = [{k: r[k] for k in GRPO_KEYS} for r in rows(straight) if "reward_mean" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    for r in logged:
        assert 0 <= r["completion_length"] <= 8 and 0 <= r["clip_fraction"] <= 1 and r["kl"] >= 0
    assert any(r["reward_std"] > 0 for r in logged)  # the dense reward tells completions apart
    first = final_params(straight, 4)
    assert any(np.any(x != 0) for x in first)  # the adapters trained (LoRA B starts at zero)

    kill_after(grpo_args(killed, root, base), killed, "4")
    assert not (killed / "checkpoints" / "8").exists(), "the run finished before it could be interrupted"
    out = run_cli(*grpo_args(killed, root, base))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr + out.stdout
    for x, y in zip(final_params(straight, 8), final_params(killed, 8), strict=True):
        np.testing.assert_array_equal(x, y)
    assert logged == [{k: r[k] for k in GRPO_KEYS} for r in rows(killed) if "reward_mean" in r]


@pytest.mark.parametrize(
    "objective, sets, message",
    [
        ("dpo", ["objective.reference=/some/run"], "objective.reference=/some/run does not exist"),
        ("dpo", ["objective.reference={other_vocab}"], "has a vocabulary of 512 but the policy's model.vocab_size=400"),
        ("grpo", ["checkpoint.every=3"], "must be a multiple of objective.iterations"),
        ("grpo", ['objective.rewards=["/nonexistent/r.py:f"]', "objective.reward_weights=[]"], "does not exist"),
    ],
)
def test_bad_objective_input_is_one_line(setup, tmp_path, objective, sets, message):
    root, base, pairs = setup
    other_vocab = tmp_path / "other_vocab"  # the base's folder with another vocabulary: refused before loading
    shutil.copytree(base, other_vocab)
    config = json.loads((other_vocab / "config.json").read_text())
    (other_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    sets = [f"--set={s.format(other_vocab=other_vocab)}" for s in sets]
    args = dpo_args(tmp_path / "run", base, pairs) if objective == "dpo" else grpo_args(tmp_path / "run", root, base)
    out = run_cli(*args, *sets)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.fixture(scope="module")
def arith_sft(setup):
    """A full fine-tune of the base on answers.jsonl: it writes ' <answer>N</answer>' and the sum
    about as often as the data does, so rewards differ within a group."""
    root, base, _ = setup
    run = root / "arith_sft"
    sets = [f"init.from={base}", f'data.inputs=["{root / "answers.jsonl"}"]', "lora.rank=0", "train.seq_len=28"]
    sets += ["train.steps=400", "train.batch_size=16", "optimizer.lr=1e-2", "train.sample_tokens=0"]
    sets += ["checkpoint.every=400", "train.log_every=100", "train.eval_every=400"]
    out = run_cli("launch.train", "--recipe", "finetune_tiny", "--run-dir", str(run), *(f"--set={s}" for s in sets))
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_grpo_raises_the_mean_reward_of_a_model_sft_taught_the_format(setup, arith_sft):
    """GRPO on LoRA from the SFT model: the sum in <answer>...</answer> (1) plus the format (0.2).
    The mean reward of the last 5 generation batches exceeds the first 5's by 0.12: 2.7 standard
    deviations of that difference for a policy that does not learn (batch means of 64 completions
    spread by about 0.07 once the reward stops rising). Rises measured with train.seed 0, 1, 2: 0.150,
    0.190, 0.201 (docs/finetune.md, GRPO)."""
    root, _, _ = setup
    run = root / "grpo_learns"
    reward = root / "reward.py"
    sets = [
        f"init.from={arith_sft}",
        f'data.inputs=["{root / "prompts.jsonl"}"]',
        "train.objective=grpo",
        f'objective.rewards=["{reward}:answer_is_sum", "{reward}:formatted"]',
        "objective.group_size=8",
        "objective.max_new_tokens=16",
        "objective.iterations=2",
        "objective.beta=0",
        "train.batch_size=64",
        "train.seq_len=28",
        "train.steps=40",
        "train.log_every=2",
        "train.sample_tokens=0",
        "checkpoint.every=40",
        "optimizer.lr=1e-2",
        "optimizer.warmup_steps=0",
    ]
    out = run_cli("launch.train", "--recipe", "finetune_tiny", "--run-dir", str(run), *(f"--set={s}" for s in sets))
    assert out.returncode == 0, out.stderr[-3000:]
    # Logged at the second pass over each generation batch: one row per batch.
    reward = [r["reward_mean"] for r in rows(run) if "reward_mean" in r]
    assert len(reward) == 20
    first, last = np.mean(reward[:5]), np.mean(reward[-5:])
    assert last > first + 0.12, (first, last, reward)
