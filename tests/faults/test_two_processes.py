"""Agreement: a decision that stops a run is taken once and shared, so both processes of a
launch.local_cluster run stop together, within seconds, with the same message, even when only one
of them can see the problem (a local --run-dir or data folder on each host)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from faultkit import LONG
from helpers import ROOT, tiny_train_args

pytestmark = pytest.mark.slow


def two_processes(tmp_path, train_args: list[str], per_process: str):
    """Run launch.train on 2 processes x 1 device; `per_process` is appended to each process's
    command line with $NNXLM_PROCESS_ID expanded, so each process can be given its own folder."""
    command = f"exec {shlex.join([sys.executable, '-m', *train_args])} {per_process}"
    args = ["launch.local_cluster", "--processes", "2", "--devices-per-process", "1"]
    args += ["--timeout", "60", "--grace", "30", "--", "sh", "-c", command]
    log_path = tmp_path / "cluster.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        first_error = None
        while proc.poll() is None:
            if first_error is None and "error:" in log_path.read_text(errors="replace"):
                first_error = time.monotonic()
            time.sleep(0.02)
        stopped = time.monotonic()
    output = log_path.read_text(errors="replace")
    return proc.returncode, output, stopped - (first_error or stopped)


def assert_both_stop_together(code, output, seconds, fragment):
    assert code == 2, output[-4000:]
    errors = dict(re.findall(r"\[p(\d)\] error: \[process \d/2\] (.*)", output))
    assert sorted(errors) == ["0", "1"], output[-4000:]
    assert errors["0"] == errors["1"], errors
    assert fragment in errors["0"], errors
    assert seconds < 10, f"the second process stopped {seconds:.1f} s after the first error"


def test_recipe_conflict_seen_by_one_process_stops_both_with_the_same_message(tmp_path, tiny_corpus, reference):
    # Process 0's local run folder holds a finished run; process 1's is empty.
    shutil.copytree(reference, tmp_path / "run0")
    lr = json.loads((reference / "recipe.json").read_text())["optimizer"]["lr"]
    full = tiny_train_args(tiny_corpus, tmp_path / "run", *LONG, f"optimizer.lr={lr / 2}")
    args = full[:3] + full[5:]  # without --run-dir, which each process gets on its own
    code, output, seconds = two_processes(tmp_path, args, f"--run-dir {tmp_path}/run$NNXLM_PROCESS_ID")
    assert_both_stop_together(code, output, seconds, f"different recipe (optimizer.lr: {lr!r} -> {lr / 2!r})")
    assert json.loads((tmp_path / "run0" / "recipe.json").read_text())["optimizer"]["lr"] == lr


def test_missing_data_seen_by_one_process_stops_both_with_the_same_message(tmp_path, tiny_corpus, reference):
    # Process 1's data folder is the prepared one; process 0's does not exist.
    prepared = json.loads((reference / "recipe.json").read_text())["data"]["dir"]
    (tmp_path / "data1").symlink_to(prepared)
    args = tiny_train_args(tiny_corpus, tmp_path / "run", *LONG, "data.inputs=[]")
    code, output, seconds = two_processes(tmp_path, args, f"--set data.dir={tmp_path}/data$NNXLM_PROCESS_ID")
    assert_both_stop_together(code, output, seconds, f"data.dir={tmp_path}/data0 holds no prepared data")
