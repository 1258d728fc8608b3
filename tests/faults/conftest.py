"""The fault-injection suite's shared reference run."""

import pathlib

import pytest
from faultkit import LONG
from helpers import run_cli, tiny_train_args


@pytest.fixture(scope="session")
def reference(tiny_corpus, tmp_path_factory) -> pathlib.Path:
    """One uninterrupted run that every interrupted one must end equal to, bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    out = run_cli(*tiny_train_args(tiny_corpus, run_dir, *LONG))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir
