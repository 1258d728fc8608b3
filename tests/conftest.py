"""Shared fixtures: tiny model configs and a tiny corpus written by the tests themselves."""

import os
import pathlib

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


# tests/multidevice needs 8 fake CPU devices, which must be requested before jax is imported;
# test_sharding.py runs it in a subprocess that sets XLA_FLAGS.
collect_ignore = [] if os.environ.get("NNXLM_MULTIDEVICE") else ["multidevice"]
