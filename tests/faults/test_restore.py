"""Restore: a checkpoint is set aside only when its files show damage; any other failure stops the
run with exit 2 and one line, every step folder in place, and the next launch resumes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from faultkit import LONG, error_lines
from helpers import ROOT, final_params, tiny_train_args

from lm.state.checkpoint import damage

pytestmark = pytest.mark.slow

# Runs launch.train with the open-file limit at the number of files already open, for the duration of
# the checkpoint restore only: a real storage error (EMFILE) in the middle of a restore, not damage.
NO_FILES_DURING_RESTORE = """
import os, resource, sys
sys.path.insert(0, os.getcwd())
from lm.state import checkpoint

restore = checkpoint.Checkpointer.restore

def restore_without_file_handles(self, *args, **kwargs):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
    try:
        return restore(self, *args, **kwargs)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

checkpoint.Checkpointer.restore = restore_without_file_handles
from launch.train import main
main(sys.argv[1:])
"""


# The same, with the address space capped at what the process already uses plus 1 MB. Where that
# bites is up to the allocator: a Python MemoryError or "can't start new thread" (exit 2, one line),
# or a C++ thread that cannot start, which aborts the process (tensorstore, XLA). Thread stacks are
# kept small (prlimit --stack) so that the limit is not simply spent on one new thread's stack.
NO_MEMORY_DURING_RESTORE = NO_FILES_DURING_RESTORE.replace(
    """    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
    try:
        return restore(self, *args, **kwargs)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))""",
    """    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + 2**20, hard))
    try:
        return restore(self, *args, **kwargs)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))""",
)


def copy_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    recipe = json.loads((run_dir / "recipe.json").read_text())
    assert recipe["checkpoint"]["dir"] is None  # the copy's checkpoints are its own
    return run_dir


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def train(corpus, run_dir, *sets):
    args = tiny_train_args(corpus, run_dir, *LONG, *sets)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_restore_failing_for_lack_of_file_handles_keeps_every_checkpoint_and_exits_2(tiny_corpus, tmp_path, reference):
    run_dir = copy_run(reference, tmp_path)
    before, metrics = listing(run_dir / "checkpoints"), (run_dir / "metrics.jsonl").read_text()
    script = tmp_path / "limited.py"
    script.write_text(NO_FILES_DURING_RESTORE)
    args = tiny_train_args(tiny_corpus, run_dir, *LONG)[1:]  # launch.train's own arguments
    out = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = error_lines(out.stderr)
    assert line.startswith("error: could not restore checkpoint 12 ") and "Too many open files" in line, line
    assert "every checkpoint was left in place" in line
    assert listing(run_dir / "checkpoints") == before == ["12", "6", "9"]
    assert (run_dir / "metrics.jsonl").read_text() == metrics, "metrics.jsonl is untouched"

    out = train(tiny_corpus, run_dir)  # the next normal launch resumes at the newest step
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'} at step 12" in out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux) for small thread stacks")
def test_restore_under_a_memory_limit_never_sets_a_checkpoint_aside(tiny_corpus, tmp_path, reference):
    """Out of memory is not damage: whichever way the restore fails, every step folder stays, and
    an orderly failure is one line with exit 2."""
    run_dir = copy_run(reference, tmp_path)
    before = listing(run_dir / "checkpoints")
    script = tmp_path / "limited.py"
    script.write_text(NO_MEMORY_DURING_RESTORE)
    args = tiny_train_args(tiny_corpus, run_dir, *LONG)[1:]
    command = ["prlimit", "--stack=262144", sys.executable, str(script), *args]
    try:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:  # a hang is a failure: the user would wait for ever
        pytest.fail(f"train hung restoring under a memory limit: {(e.stderr or b'').decode(errors='replace')[-2000:]}")
    code, stderr = out.returncode, out.stderr
    print(f"restore under a 1 MB memory margin: exit {code}; {error_lines(stderr) or stderr[-300:]}")
    if code == 2:
        (line,) = error_lines(stderr)
        assert line.startswith("error: could not restore checkpoint 12 ") and "left in place" in line, line
    else:
        assert code in (0, -6, 134), stderr[-3000:]  # restored after all, or aborted in C++
    assert listing(run_dir / "checkpoints") == before == ["12", "6", "9"]
    # Intact, so the next launch resumes there (as after the open-file limit above).
    assert damage(run_dir / "checkpoints" / "12") is None


def truncate_largest_array_file(step_dir):
    data = [p for p in (step_dir / "optimizer").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(data, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def garble_metadata(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"recipe": {"name": "half a fi')


def delete_the_largest_array_file(step_dir):
    data = [p for p in (step_dir / "model").rglob("*") if p.is_file() and p.parent.name == "d"]
    max(data, key=lambda p: p.stat().st_size).unlink()  # the parameters themselves


def delete_data_state(step_dir):
    for p in (step_dir / "data").glob("process_*.json"):
        p.unlink()


@pytest.mark.parametrize(
    "harm", [truncate_largest_array_file, garble_metadata, delete_the_largest_array_file, delete_data_state]
)
def test_damage_is_found_in_the_files_themselves(tmp_path, reference, harm):
    step_dir = tmp_path / "12"
    shutil.copytree(reference / "checkpoints" / "12", step_dir)
    assert damage(step_dir) is None, "an intact checkpoint shows no damage"
    harm(step_dir)
    assert damage(step_dir) is not None


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_continues_from_the_one_before(
    tiny_corpus, tmp_path, reference
):
    run_dir = copy_run(reference, tmp_path)
    truncate_largest_array_file(run_dir / "checkpoints" / "12")
    rows_before = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = train(tiny_corpus, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "checkpoint 12 is damaged (" in text and "set aside as 12.damaged-" in text, text[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'} at step 9" in text
    aside = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("12.damaged-")]
    assert len(aside) == 1 and (aside[0] / "model").is_dir(), "the damaged step is kept, renamed"
    # Steps 10-12 still exist (set aside), so their rows stay; the redone steps are logged again.
    rows_after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert rows_after[: len(rows_before)] == rows_before
    redone = [json.loads(r)["step"] for r in rows_after[len(rows_before) :] if "loss" in json.loads(r)]
    assert redone == [10, 11, 12]
    for x, y in zip(final_params(reference, 12), final_params(run_dir, 12), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit


def test_metrics_are_not_cut_back_when_a_run_restarts_below_its_set_aside_steps(tiny_corpus, tmp_path, reference):
    """Even with every finished step gone (set aside by hand), the rows of set-aside steps stay."""
    run_dir = copy_run(reference, tmp_path)
    for step in ("6", "9", "12"):
        os.rename(run_dir / "checkpoints" / step, run_dir / "checkpoints" / f"{step}.damaged-1")
    rows_before = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = train(tiny_corpus, run_dir, "train.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text().splitlines()[: len(rows_before)] == rows_before
