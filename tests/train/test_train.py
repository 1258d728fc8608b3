"""End to end through the command line: train, checkpoint, sample, resume, and bad input."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, final_params, run_cli, tiny_train_args

pytestmark = pytest.mark.slow


def metrics(run_dir):
    """Last logged row per step (a resumed run may log a step twice)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def test_tiny_run_writes_metrics_checkpoint_and_sample(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(*tiny_train_args(tiny_corpus, run_dir, "train.profile_steps=4:5"))
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("recipe.json", "tokenizer.model", "metrics.jsonl"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "profile").rglob("*.xplane.pb"))  # train.profile_steps
    assert any((run_dir / "compile_cache").iterdir())  # train.compilation_cache=auto
    assert (run_dir / "checkpoints" / "6").is_dir() and (run_dir / "checkpoints" / "3").is_dir()
    rows = metrics(run_dir)
    assert set(rows) == {0, 2, 3, 4, 6}
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "mfu_maxtext"):
        assert key in rows[6], key
    assert {"eval_loss", "eval_ppl"} <= set(rows[6])
    assert rows[6]["loss"] < rows[2]["loss"] and rows[6]["eval_loss"] < rows[0]["eval_loss"]
    assert "--- sample ---\ndef " in out.stdout


def test_interrupted_run_resumes_from_its_checkpoint(tiny_corpus, tmp_path):
    sets = ("train.steps=30", "checkpoint.every=5", "train.log_every=1", "train.eval_every=100")
    straight = tmp_path / "straight"
    assert run_cli(*tiny_train_args(tiny_corpus, straight, *sets)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", *tiny_train_args(tiny_corpus, killed, *sets)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "5").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = max(metrics(killed))
    assert interrupted_at < 30, "the run finished before it could be interrupted"

    out = run_cli(*tiny_train_args(tiny_corpus, killed, *sets))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr + out.stdout
    a, b = metrics(straight), metrics(killed)
    for step in range(6, 31):  # every step after the first checkpoint, as recomputed after the restart
        assert b[step]["loss"] == a[step]["loss"], step
    for x, y in zip(final_params(straight, 30), final_params(killed, 30), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit


def _write_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / "empty" / name).write_text("")
    return str(tmp_path / "empty" / "*.txt")


@pytest.mark.parametrize(
    "case, sets, message",
    [
        ("unknown key", ["train.stepz=3"], "unknown recipe key"),
        ("wrong type", ["train.steps=ten"], "expects int"),
        ("missing corpus", ['data.inputs=["/nonexistent/corpus/*.txt"]'], "/nonexistent/corpus"),
        ("empty corpus", None, "empty"),
        ("invalid model", ["model.n_heads=4", "model.n_kv_heads=3"], "not divisible"),
        ("kernel this platform lacks", ["model.attention_impl=cudnn"], "model.attention_impl=cudnn needs a GPU"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, case, sets, message):
    if sets is None:
        sets = [f'data.inputs=["{_write_empty_corpus(tmp_path)}"]']
    args = [
        "launch.train",
        "--recipe",
        "stdlib_tiny",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        "logging.wandb=disabled",
    ]
    for s in sets:
        args += ["--set", s]
    out = run_cli(*args)
    assert out.returncode == 2, (case, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
