"""Kills: SIGKILL at seeded random points of a run (data preparation, an asynchronous save, eval,
a training step, the final sample), each followed by the same command; the run ends with exactly
the parameters of an uninterrupted run. SIGTERM during eval or a save exits 0 with a checkpoint
that resumes to the same parameters.

Moments are recognised from what the run writes (its progress bar, metrics.jsonl, orbax's
temporary step folders), not from sleeps. The seed is printed; NNXLM_FAULT_SEED replays a sequence.
"""

import functools
import json
import os
import random
import re
import signal

import numpy as np
import pytest
from faultkit import LONG, launch, wait_until
from helpers import final_params, losses, tiny_train_args

from lm.state.checkpoint import finished_steps

pytestmark = pytest.mark.slow
STEPS = 12
SEED = int(os.environ.get("NNXLM_FAULT_SEED", "20261124"))


class Attempt:
    """One launch of the run, with its own log, and the moments it can be interrupted at."""

    def __init__(self, args, run_dir, log_path):
        self.run_dir, self.log_path = run_dir, log_path
        self.ckpt = run_dir / "checkpoints"
        self.old_tmp = self.tmp_folders()  # left by an earlier kill: not this attempt's saves
        self.proc = launch(args, log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def progress(self) -> int:
        """Steps this attempt has reached, from its progress bar ('7/12 [')."""
        return max([int(n) for n in re.findall(rf"(\d+)/{STEPS} \[", self.log())] or [0])

    def tmp_folders(self) -> set[str]:
        return {p.name for p in self.ckpt.glob("*.orbax-checkpoint-tmp*")} if self.ckpt.is_dir() else set()

    def last_row(self) -> dict:
        lines = (
            (self.run_dir / "metrics.jsonl").read_text().splitlines()
            if (self.run_dir / "metrics.jsonl").exists()
            else []
        )
        try:
            return json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:  # caught mid-write
            return {}

    # The moments, as conditions on what this attempt has written so far.
    def preparing_data(self) -> bool:
        data = self.run_dir / "data"
        return data.is_dir() and not (data / "meta.json").exists()

    def after_step(self, step: int) -> bool:
        return self.progress() >= step

    def in_eval(self, step: int) -> bool:
        # The loop's first line ('MFU: ...') comes after metrics.jsonl is cut back to the restored
        # step, so from then on its last row is this attempt's: step's training row, not yet its eval.
        row = self.last_row()
        return "MFU:" in self.log() and row.get("step") == step and "loss" in row

    def saving(self, step: int) -> bool:
        return any(name.startswith(f"{step}.") for name in self.tmp_folders() - self.old_tmp)

    def sampling(self) -> bool:
        return STEPS in finished_steps(self.ckpt) and f"step {STEPS}: eval loss" in self.log()


def kill_points(rng: random.Random) -> list[tuple[str, callable]]:
    """Data preparation first (only a fresh run prepares), the final sample last, and in between a
    seeded choice of an asynchronous save, an eval and two training steps (one on each side of the
    first save chosen), in step order: each attempt resumes from what the one before left."""
    save, evaluation = rng.choice([6, 9]), rng.choice([4, 8])
    early, late = (s for s in (1, 2, 3, 5) if s != evaluation), (s for s in (7, 10, 11) if s != save)
    steps = [rng.choice(list(early)), rng.choice(list(late))]  # one before checkpoint 6, one after
    middle = [(save, 2, f"async save of checkpoint {save}", lambda a, s=save: a.saving(s))]
    middle += [(evaluation, 1, f"eval at step {evaluation}", lambda a, s=evaluation: a.in_eval(s))]
    middle += [(s, 0, f"after training step {s}", lambda a, s=s: a.after_step(s)) for s in steps]
    middle.sort(key=lambda point: point[:2])
    return (
        [("data preparation", Attempt.preparing_data)]
        + [(label, condition) for _, _, label, condition in middle]
        + [("final sample", Attempt.sampling)]
    )


def assert_same_as(reference, run_dir):
    assert losses(run_dir) == losses(reference), "resumed losses differ from the uninterrupted run"
    for x, y in zip(final_params(reference, STEPS), final_params(run_dir, STEPS), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit


def test_sigkill_at_seeded_points_then_resume_ends_bit_for_bit_equal(tiny_corpus, tmp_path, reference):
    rng = random.Random(SEED)
    points = kill_points(rng)
    print(f"kill points (NNXLM_FAULT_SEED={SEED}): {[label for label, _ in points]}")
    run_dir = tmp_path / "run"
    # This run prepares its own data (data.dir inside the run), so a kill can land in preparation.
    args = tiny_train_args(tiny_corpus, run_dir, *LONG, f"data.dir={run_dir / 'data'}")
    for i, (label, condition) in enumerate(points):
        attempt = Attempt(args, run_dir, tmp_path / f"attempt{i}.log")
        try:
            reached = wait_until(functools.partial(condition, attempt), attempt.proc)
            assert reached and attempt.proc.poll() is None, f"the run ended before {label}:\n{attempt.log()[-3000:]}"
            attempt.proc.send_signal(signal.SIGKILL)
            assert attempt.proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            attempt.proc.kill()
        print(f"killed at {label}; finished checkpoints {finished_steps(run_dir / 'checkpoints')}")
    final = Attempt(args, run_dir, tmp_path / "final.log")
    assert final.proc.wait(timeout=600) == 0, final.log()[-3000:]
    assert_same_as(reference, run_dir)


@pytest.mark.parametrize("moment", ["eval", "save"])
def test_sigterm_during_eval_or_save_exits_zero_with_a_resumable_checkpoint(tiny_corpus, tmp_path, reference, moment):
    run_dir = tmp_path / "run"
    args = tiny_train_args(tiny_corpus, run_dir, *LONG)
    attempt = Attempt(args, run_dir, tmp_path / "first.log")
    try:
        condition = (lambda: attempt.in_eval(4)) if moment == "eval" else (lambda: attempt.saving(6))
        assert wait_until(condition, attempt.proc) and attempt.proc.poll() is None, attempt.log()[-3000:]
        attempt.proc.send_signal(signal.SIGTERM)
        assert attempt.proc.wait(timeout=120) == 0, attempt.log()[-3000:]
    finally:
        attempt.proc.kill()
    saved = int(re.search(r"preempted: saved checkpoint (\d+)", attempt.log()).group(1))
    assert saved in finished_steps(run_dir / "checkpoints") and saved >= (4 if moment == "eval" else 6)
    resumed = Attempt(args, run_dir, tmp_path / "resumed.log")
    assert resumed.proc.wait(timeout=600) == 0, resumed.log()[-3000:]
    assert f"at step {saved}" in resumed.log()
    assert_same_as(reference, run_dir)
