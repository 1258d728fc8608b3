"""Shared fixtures: tiny model configs and a tiny corpus written by the tests themselves."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_cfg():
    from lm.config import ModelConfig

    return ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> pathlib.Path:
    """A few hundred KB of real Python source: 60 standard-library files, copied."""
    from lm.data import stdlib_files

    out = tmp_path_factory.mktemp("corpus")
    for path in stdlib_files()[:: max(1, len(stdlib_files()) // 60)][:60]:
        (out / f"{path.parent.name}_{path.name}.txt").write_text(path.read_text(errors="replace"))
    return out


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repo root, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
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


# tests/multidevice needs 8 fake CPU devices, which must be requested before jax is imported;
# test_sharding.py runs it in a subprocess that sets XLA_FLAGS.
collect_ignore = [] if os.environ.get("NNXLM_MULTIDEVICE") else ["multidevice"]
