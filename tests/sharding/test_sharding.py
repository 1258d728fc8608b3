"""Runs tests/multidevice in subprocesses with 8 fake CPU devices (XLA_FLAGS must precede jax): one
subprocess per file, so that pytest-xdist spreads them over the workers."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


FILES = sorted(p.name for p in (ROOT / "tests" / "multidevice").glob("test_*.py"))


@pytest.mark.parametrize("name", FILES)
def test_multidevice_file_on_8_fake_cpu_devices(name):
    env = {**os.environ, "NNXLM_MULTIDEVICE": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", f"tests/multidevice/{name}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-500:]
