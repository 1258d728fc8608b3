"""Save errors: a checkpoint folder that cannot be written stops the run within seconds with one
line naming the folder and the cause, exit code 2, and earlier checkpoints intact."""

import subprocess
import sys
import time

import pytest
from faultkit import LONG, can_mount, error_lines, launch, mounted, wait_until
from helpers import ROOT, tiny_train_args

from lm.state.checkpoint import finished_steps

pytestmark = pytest.mark.slow
NO_MOUNT = can_mount()


def timed_train(corpus, run_dir, *sets):
    start = time.monotonic()
    args = tiny_train_args(corpus, run_dir, *LONG, *sets)
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return out, time.monotonic() - start


def assert_one_line(out, *fragments):
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = error_lines(out.stderr)
    assert out.stderr.strip().splitlines()[-1] == line
    for fragment in fragments:
        assert fragment in line, line


def test_checkpoint_dir_that_is_a_file_stops_before_the_first_step(tiny_corpus, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    out, seconds = timed_train(tiny_corpus, tmp_path / "run", f"checkpoint.dir={blocker}")
    assert_one_line(out, f"checkpoint.dir {blocker} is a file")
    assert seconds < 30, seconds
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "no step ran"


@pytest.mark.skipif(NO_MOUNT is not None, reason=f"read-only folder needs a bind mount: {NO_MOUNT}")
def test_read_only_checkpoint_dir_stops_before_the_first_step(tiny_corpus, tmp_path):
    # We run as root, which chmod does not stop: a read-only bind mount does.
    source, target = tmp_path / "source", tmp_path / "read-only"
    source.mkdir()
    target.mkdir()
    with mounted("--bind", str(source), str(target)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        out, seconds = timed_train(tiny_corpus, tmp_path / "run", f"checkpoint.dir={target / 'ckpt'}")
    assert_one_line(out, f"checkpoint.dir {target / 'ckpt'} is not writable (Read-only file system)")
    assert seconds < 30, seconds


@pytest.mark.skipif(NO_MOUNT is not None, reason=f"a full disk needs a small tmpfs: {NO_MOUNT}")
def test_full_disk_stops_the_run_within_seconds_keeping_the_earlier_checkpoint(tiny_corpus, tmp_path):
    """A 2 MB tmpfs holds checkpoint 3 (about 1.3 MB) but not checkpoint 6: orbax's background
    write fails, and the loop reports it at the next step."""
    disk = tmp_path / "disk"
    disk.mkdir()
    folder = disk / "ckpt"
    with mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)):
        proc = launch(
            tiny_train_args(tiny_corpus, tmp_path / "run", *LONG, f"checkpoint.dir={folder}"), tmp_path / "log"
        )
        try:
            assert wait_until(lambda: any(p.name.startswith("6.") for p in folder.glob("*")), proc), (
                tmp_path / "log"
            ).read_text()[-3000:]
            failing = time.monotonic()
            proc.wait(timeout=60)
            seconds = time.monotonic() - failing
        finally:
            proc.kill()
        output = (tmp_path / "log").read_text()
        assert proc.returncode == 2, output[-3000:]
        assert seconds < 30, seconds
        assert "Traceback" not in output, output[-3000:]
        (line,) = error_lines(output)
        assert line.startswith(f"error: cannot save checkpoint 6 to {folder}: No space left on device"), line
        assert finished_steps(folder) == [3], "the earlier checkpoint is intact and still counts"
