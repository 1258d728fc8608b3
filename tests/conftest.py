"""Shared fixtures: tiny model configs and a tiny corpus written by the tests themselves.

NNX_LM_TREE_MODE=1 runs the suite in NNX tree mode, switched on here before any test imports flax
code (the commands the tests start switch it on themselves, in launch.cli.main_guard). Under CI=true
a missing test extra stops the session instead of skipping the tests that need it.
"""

import importlib
import os
import pathlib
import tomllib

import pytest

from launch.cli import tree_mode

ROOT = pathlib.Path(__file__).resolve().parent.parent
tree_mode()


def pytest_sessionstart(session):
    if os.environ.get("CI") != "true":
        return
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    for requirement in extras:
        name = requirement.split("=")[0].split(">")[0].split("<")[0].strip()
        module = {"import-linter": "importlinter", "pytest-xdist": "xdist"}.get(name, name.replace("-", "_"))
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise pytest.UsageError(
                f"CI=true but the test extra {name} does not import ({e}); install it: pip install -e '.[test]'"
            ) from None


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`) a module's tests share a worker, so
    its module fixtures are built once; the multidevice files (each its own subprocess) spread out."""
    spread = ("tests/sharding/test_sharding.py::",)
    for item in items:
        group = item.nodeid if item.nodeid.startswith(spread) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


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
