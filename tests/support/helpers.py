"""Helpers shared by test modules (tests/support is on pytest's pythonpath)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def losses(run_dir: pathlib.Path) -> dict[int, float]:
    """The training loss of each logged step in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def final_params(run_dir: pathlib.Path, step: int) -> list:
    """The parameter arrays of a run's checkpoint, read straight from disk (no model needed)."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return jax.tree.leaves(checkpointer.restore(run_dir / "checkpoints" / str(step) / "model"))


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, stdin: str | None = None):
    """Run `python -m <args>` from the repo root, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin if stdin is not None else "",
    )


def tiny_train_args(corpus: pathlib.Path, run_dir: pathlib.Path, *extra: str) -> list[str]:
    """launch.train arguments for a seconds-long run on the tiny corpus."""
    sets = [
        "model.vocab_size=512",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.d_ff=128",
        "model.max_seq_len=64",
        "train.seq_len=64",
        "train.batch_size=8",
        "train.steps=6",
        "train.log_every=2",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.sample_tokens=16",
        "optimizer.warmup_steps=2",
        "checkpoint.every=3",
        "logging.wandb=disabled",
        "data.eval_fraction=0.1",
        f'data.inputs=["{corpus}/*.txt"]',
        f"data.dir={corpus.parent / 'prepared'}",
    ]
    args = ["launch.train", "--recipe", "stdlib_tiny", "--run-dir", str(run_dir)]
    for s in sets + list(extra):
        args += ["--set", s]
    return args
