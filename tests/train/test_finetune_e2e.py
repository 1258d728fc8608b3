"""Fine-tuning end to end through the command line, on CPU: a tiny random transformers Llama with a BPE
tokenizer the test trains, LoRA on a chat JSONL the test writes, then chat generation and both exports
checked by transformers and peft; resume after a kill; bad input."""

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
peft = pytest.importorskip("peft")
from hf_builders import bpe_folder, tiny_llama  # noqa: E402


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = ["Ada", "Bob", "Cy", "Dee", "Eve"]
    out = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        messages = [{"role": "system", "content": "You add numbers."}] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": f"{rng.choice(names)} asks: {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    tokenizer = bpe_folder(root / "tok", gpt2=False)
    base = tiny_llama(root / "base", tokenizer, vocab_size=400, context=64)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in chat_records(200)))
    return root, base, chat


def train_args(run_dir, base, chat, *extra):
    sets = [
        f"init.from={base}",
        f'data.inputs=["{chat}"]',
        "train.seq_len=64",
        "train.steps=24",
        "train.eval_every=12",
        "train.log_every=4",
        "train.sample_tokens=8",
        "checkpoint.every=8",
        "optimizer.lr=1e-2",
        "lora.dropout=0.05",  # dropout draws from the step: resume stays exact, and the export says so
        *extra,
    ]
    args = ["launch.train", "--recipe", "finetune_tiny", "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return args


def rows(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
    return out


@pytest.fixture(scope="module")
def lora_run(setup):
    root, base, chat = setup
    run = root / "lora"
    out = run_cli(*train_args(run, base, chat))
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out


def test_lora_finetune_lowers_held_out_completion_loss(lora_run, setup):
    run, out = lora_run
    r = rows(run)
    assert r[24]["eval_loss"] < r[0]["eval_loss"] - 0.3, (r[0], r[24])
    assert "a checkpoint holds the adapter and its optimizer state" in out.stdout + out.stderr
    # The checkpoint holds the adapter and the base's identity, not the base.
    meta = json.loads((run / "checkpoints" / "24" / "meta" / "metadata").read_text())
    assert meta["base"]["from"] == str(setup[1]) and len(meta["base"]["fingerprint"]) == 64
    names = {k.removesuffix(".value") for k in _flat_keys(run / "checkpoints" / "24")}
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names), sorted(names)[:5]
    adapter_bytes = sum(f.stat().st_size for f in (run / "checkpoints" / "24" / "model").rglob("*") if f.is_file())
    assert adapter_bytes < 0.25 * (setup[1] / "model.safetensors").stat().st_size


def _flat_keys(step_dir):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        tree = c.restore(step_dir / "model")

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            yield prefix

    return list(walk(tree))


def test_chat_generation_uses_base_plus_adapter(lora_run, setup, tmp_path):
    """generate --chat on the LoRA run against transformers + peft's greedy generate on the exported
    adapter: the same prompt tokens through the chat template, the same new tokens."""
    import torch

    run, _ = lora_run
    prompt = "Ada asks: 2 plus 3?"
    out = run_cli("launch.generate", "--run-dir", str(run), "--chat", "--prompt", prompt,
                  "--max-new-tokens", "8", "--output", str(tmp_path / "gen.jsonl"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads((tmp_path / "gen.jsonl").read_text().splitlines()[0])
    out = run_cli("launch.convert", "--run-dir", str(run), "--hf-out", str(tmp_path / "adapter"), "--adapter-only")
    assert out.returncode == 0, out.stderr[-2000:]
    tokenizer = transformers.AutoTokenizer.from_pretrained(run)
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    ids = torch.as_tensor([list(ids)])
    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    assert row["tokens"] == theirs and len(theirs) > 0, (row["tokens"], theirs)


def test_score_takes_the_chat_file_and_scores_the_replies(lora_run, setup):
    run, _ = lora_run
    root, base, chat = setup
    tuned = run_cli("launch.score", "--run-dir", str(run), "--input", str(chat), "--json")
    before = run_cli("launch.score", "--hf", str(base), "--input", str(chat), "--json")
    assert tuned.returncode == 0 and before.returncode == 0, tuned.stderr[-2000:] + before.stderr[-2000:]
    tuned, before = json.loads(tuned.stdout.splitlines()[-1]), json.loads(before.stdout.splitlines()[-1])
    assert tuned["tokens"] == before["tokens"] and tuned["documents"] == 200
    assert tuned["mean_nll"] < before["mean_nll"] - 0.3


def our_logits(run, tokens):
    from lm.infer.load import load_run

    model = load_run(run_dir=run, need_tokenizer=False).model
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model(tokens, positions))


def test_exports_merged_and_adapter_give_our_logits(lora_run, setup, tmp_path):
    import torch

    run, _ = lora_run
    base = setup[1]
    tokens = np.random.default_rng(0).integers(0, 400, (2, 24))
    ours = our_logits(run, tokens)
    with torch.no_grad():
        out = run_cli("launch.convert", "--run-dir", str(run), "--hf-out", str(tmp_path / "merged"))
        assert out.returncode == 0, out.stderr[-2000:]
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        np.testing.assert_allclose(merged(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)

        out = run_cli("launch.convert", "--run-dir", str(run), "--hf-out", str(tmp_path / "adapter"), "--adapter-only")
        assert out.returncode == 0, out.stderr[-2000:]
        files = {p.name for p in (tmp_path / "adapter").iterdir()}
        assert files == {"adapter_model.safetensors", "adapter_config.json"}
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16.0, 0.05)  # the run's own
        assert config["base_model_name_or_path"] == str(base)  # absolute: peft finds the base by itself
        adapted = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32).eval()
        np.testing.assert_allclose(adapted(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)


def test_init_from_a_lora_run_starts_from_its_merged_weights(lora_run, setup, tmp_path):
    run, _ = lora_run
    root, base, chat = setup
    out = run_cli(*train_args(tmp_path / "full", run, chat, "lora.rank=0", "train.steps=2", "train.eval_every=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    # Same held-out batches: the new run's untrained eval is the LoRA run's final one (merged = unmerged).
    assert abs(rows(tmp_path / "full")[0]["eval_loss"] - rows(run)[24]["eval_loss"]) < 1e-4


def test_killed_finetune_resumes_bit_for_bit(setup, lora_run):
    root, base, chat = setup
    straight, _ = lora_run
    killed = root / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", *train_args(killed, base, chat)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "8").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "24").exists(), "the run finished before it could be interrupted"
    out = run_cli(*train_args(killed, base, chat))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr + out.stdout
    for x, y in zip(final_params(straight, 24), final_params(killed, 24), strict=True):
        np.testing.assert_array_equal(x, y)  # the adapters, bit for bit


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.n_layers=3"], "conflicts with init.from"),
        (["init.from=/nonexistent/model"], "does not exist"),
        (["lora.targets=nothing"], "matches no projection"),
    ],
)
def test_bad_finetune_input_is_one_line(setup, tmp_path, sets, message):
    root, base, chat = setup
    out = run_cli(*train_args(tmp_path / "run", base, chat, *sets))
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last


def test_finetune_recipe_needs_init_from(tmp_path):
    out = run_cli("launch.train", "--recipe", "finetune_tiny", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "init.from" in out.stderr.strip().splitlines()[-1]


def test_lora_base_is_checked_at_inference_and_export_and_a_relative_init_from_works_anywhere(setup, tmp_path):
    """Trained from another folder with a relative init.from, the run still finds its base from the
    repository root (else the error would be that init.from=base does not exist); once the base's
    files change, convert (and generate and score, which load the same way) refuse with one line."""
    import os
    import shutil

    from safetensors.numpy import load_file, save_file

    root, base, chat = setup
    work = tmp_path / "work"
    shutil.copytree(base, work / "base")
    args = train_args("lora", "base", chat, "train.steps=2", "train.eval_every=100", "train.sample_tokens=0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", *args], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run = work / "lora"
    weights = load_file(work / "base" / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1  # other weights in the same place
    save_file(weights, work / "base" / "model.safetensors", metadata={"format": "pt"})
    out = run_cli("launch.convert", "--run-dir", str(run), "--hf-out", str(tmp_path / "merged"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "trained on the base" in lines[-1] and "now holds other weights" in lines[-1], lines
    assert not (tmp_path / "merged").exists()
