"""The layering of docs/architecture.md holds: import-linter's contracts in pyproject.toml (layers
top to bottom, no cycles in any package, and what the config, model and sharding code may import)."""

import pathlib
import subprocess
import sys

from helpers import ROOT


def test_import_contracts_hold():
    lint = pathlib.Path(sys.executable).parent / "lint-imports"  # installed by the test extra
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_importing_the_library_changes_no_process_state():
    """`import lm...` sets no flax flag and installs no hook: those belong to a program, not a library."""
    code = (
        "import sys, threading; from flax import nnx; hooks = (sys.excepthook, threading.excepthook, "
        "sys.unraisablehook); eager = nnx.using_eager_sharding()\n"
        "import lm.train.loop, lm.infer.load, lm.hf, lm.state.checkpoint, lm.bench\n"
        "assert (sys.excepthook, threading.excepthook, sys.unraisablehook) == hooks, 'a hook was replaced'\n"
        "assert nnx.using_eager_sharding() == eager, 'eager sharding was changed'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
