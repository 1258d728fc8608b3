"""Exact resume and fault tolerance, through the command line as a user meets them."""

import errno
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from helpers import ROOT, final_params, losses, run_cli, tiny_train_args

from lm.errors import UserError
from lm.state.checkpoint import _save_errors

pytestmark = pytest.mark.slow
LONG = ("train.steps=24", "checkpoint.every=4", "train.log_every=1", "train.eval_every=100")


def snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def straight(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    out = run_cli(*tiny_train_args(tiny_corpus, run_dir, *LONG))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def start(corpus, run_dir, *sets):
    return subprocess.Popen(
        [sys.executable, "-m", *tiny_train_args(corpus, run_dir, *sets)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_saves_exits_zero_and_resumes_bitwise(tiny_corpus, tmp_path, straight):
    run_dir = tmp_path / "run"
    proc = start(tiny_corpus, run_dir, *LONG)
    deadline = time.time() + 300
    while len(losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < 7 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "preempted: saved checkpoint" in output
    stopped = int(output.split("preempted: saved checkpoint ")[1].split()[0])
    assert 7 <= stopped < 24 and (run_dir / "checkpoints" / str(stopped)).is_dir()

    out = run_cli(*tiny_train_args(tiny_corpus, run_dir, *LONG))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'} at step {stopped}" in out.stdout + out.stderr
    a, b = losses(straight), losses(run_dir)
    assert all(b[s] == a[s] for s in range(1, 25)), "resumed losses differ from the uninterrupted run"
    for x, y in zip(final_params(straight, 24), final_params(run_dir, 24), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit


def test_non_finite_step_stops_and_keeps_last_good_checkpoint(tiny_corpus, tmp_path):
    # lr is 0 on step 1 (warm-up) and 1e38 on step 2: the parameters overflow on step 2.
    run_dir = tmp_path / "run"
    sets = ("optimizer.lr=1e38", "optimizer.warmup_steps=1", "checkpoint.every=1", "train.log_every=1")
    out = run_cli(*tiny_train_args(tiny_corpus, run_dir, *sets))
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite values at step 2") and "last good checkpoint is step 1" in last, last
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    gen = run_cli("launch.generate", "--run-dir", str(run_dir), "--prompt", "def ", "--max-new-tokens", "4")
    assert gen.returncode == 0, gen.stderr[-2000:]  # the good checkpoint loads


def test_conflicting_recipe_and_foreign_checkpoint_are_refused_untouched(tiny_corpus, tmp_path, straight):
    before = snapshot(straight)
    out = run_cli(*tiny_train_args(tiny_corpus, straight, *LONG, "model.d_model=32"))
    assert out.returncode == 2
    assert "model.d_model: 64 -> 32" in out.stderr.strip().splitlines()[-1]
    # Checkpoints copied into a run directory without recipe.json: caught from the checkpoint itself.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    subprocess.run(["cp", "-r", str(straight / "checkpoints"), str(foreign)], check=True)
    out = run_cli(*tiny_train_args(tiny_corpus, foreign, *LONG, "model.d_ff=256"))
    assert out.returncode == 2 and "holds the checkpoints of another run" in out.stderr, out.stderr[-2000:]
    assert snapshot(straight) == before


def test_token_file_vocab_larger_than_model_is_refused(tiny_corpus, tmp_path):
    prepared = tmp_path / "prepared"
    prep = run_cli("launch.prepare", "--input", f"{tiny_corpus}/*.txt", "--out", str(prepared), "--vocab-size", "512")
    assert prep.returncode == 0, prep.stderr[-2000:]
    out = run_cli(*tiny_train_args(tiny_corpus, tmp_path / "run", "model.vocab_size=300", f"data.dir={prepared}"))
    assert out.returncode == 2
    assert "has a vocabulary of 512 but model.vocab_size=300" in out.stderr.strip().splitlines()[-1]


def test_save_errors_become_one_line_naming_the_folder_and_the_cause(tmp_path):
    """The real thing (a full tmpfs) is in tests/faults/test_save.py; this checks the wording."""
    ckpt = types.SimpleNamespace(directory=tmp_path, failed=False)
    with pytest.raises(UserError, match=rf"cannot save checkpoint 7 to {tmp_path}: No space left on device; .* intact"):
        with _save_errors(ckpt, 7):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise ValueError("RESOURCE_EXHAUSTED: Error writing ...") from e
    assert ckpt.failed


def test_a_run_owns_its_checkpoints_and_they_move_only_with_it(tiny_corpus, tmp_path):
    """Another run pointed at a run's checkpoint.dir is refused (its run id, and the whole recipe in
    the checkpoint's meta even when the run folder is gone); a run whose checkpoint.dir moves
    continues only from a folder that holds its steps, and its metrics.jsonl keeps every row."""
    shared, a = tmp_path / "ck", tmp_path / "runs" / "a"
    out = run_cli(*tiny_train_args(tiny_corpus, a, f"checkpoint.dir={shared}"))
    assert out.returncode == 0, out.stderr[-3000:]
    before, rows = snapshot(shared), (a / "metrics.jsonl").read_text()

    def refused(run_dir, *sets, says):
        out = run_cli(*tiny_train_args(tiny_corpus, run_dir, *sets))
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and says in lines[-1], out.stderr[-3000:]
        assert lines[-1].startswith("error: ") and not any("Traceback" in line for line in lines)
        assert snapshot(shared) == before, "a refused run touched the checkpoints"

    refused(tmp_path / "runs" / "b", f"checkpoint.dir={shared}", "optimizer.lr=1e-4", "train.steps=12",
            says=f"checkpoint.dir {shared} holds the checkpoints of another run ({a})")  # fmt: skip
    # A pod worker whose local run folder is gone: the recipe in the checkpoint's meta still holds.
    a.rename(tmp_path / "a.kept")
    refused(a, f"checkpoint.dir={shared}", "optimizer.lr=1e-4", says="different recipe (optimizer.lr: 0.003 -> 0.0001)")
    assert not a.exists(), "a refused run wrote its run folder"
    (tmp_path / "a.kept").rename(a)
    # Moving checkpoint.dir to an empty folder would restart at step 0: refused, metrics kept.
    moved = tmp_path / "moved"
    refused(a, f"checkpoint.dir={moved}", says=f"checkpoint.dir moved from {shared} to {moved}, which holds none")
    assert (a / "metrics.jsonl").read_text() == rows
    shutil.copytree(shared, moved)
    out = run_cli(*tiny_train_args(tiny_corpus, a, f"checkpoint.dir={moved}", "train.steps=9"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {moved} at step 6" in out.stdout + out.stderr
    assert (a / "metrics.jsonl").read_text().startswith(rows) and max(losses(a)) == 9
    assert snapshot(shared) == before
