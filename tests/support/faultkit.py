"""Shared pieces of the fault-injection suite: real processes and real files."""

import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from helpers import ROOT

# A run long enough to be interrupted in every phase: checkpoints at 3, 6, 9, 12; evals at 4, 8, 12.
LONG = ("train.steps=12", "checkpoint.every=3", "train.log_every=1", "train.eval_every=4")


def launch(args: list[str], log_path: pathlib.Path) -> subprocess.Popen:
    """Start `python -m <args>` with its output going to a file the test can watch."""
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_until(condition, proc: subprocess.Popen, seconds: float = 240, poll: float = 0.005) -> bool:
    """Poll `condition` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            return condition()
        assert time.monotonic() < deadline, "timed out waiting for the moment to interrupt"
        time.sleep(poll)
    return True


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def can_mount() -> str | None:
    """None if this sandbox lets the test mount a tmpfs; otherwise why not."""
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True, text=True)
        if out.returncode != 0:
            return f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode})"
        subprocess.run(["umount", d], check=True)
    return None


@contextlib.contextmanager
def mounted(*command: str):
    """Run a mount command for the duration of the block; unmount after."""
    target = command[-1]
    subprocess.run(["mount", *command], check=True)
    try:
        yield pathlib.Path(target)
    finally:
        subprocess.run(["umount", "-l", target], check=False)
