"""train.eval_tasks: lm_eval tasks on the live model during training, as eval/<task>/<metric> rows of
metrics.jsonl at the right steps; the same numbers as launch.eval's backend on the saved checkpoint;
unchanged after a SIGKILL and a resume; and the same on a run of 2 processes."""

import json
import signal

import pytest
from eval_tasks import TASKS
from faultkit import launch, wait_until
from helpers import run_cli, tiny_train_args

pytestmark = pytest.mark.slow
EVAL_TASKS = TASKS[:2]  # the multiple-choice and the rolling-perplexity task


def _args(corpus, run_dir, task_folder, *extra):
    return tiny_train_args(
        corpus, run_dir,
        f"train.eval_tasks={json.dumps(list(EVAL_TASKS))}", "train.eval_tasks_every=2", "train.eval_tasks_limit=4",
        f"train.eval_include_path={task_folder}", "train.sample_tokens=0", *extra,
    )  # fmt: skip


def _task_rows(run_dir) -> dict[int, dict]:
    """The eval/ rows of metrics.jsonl by step (a later row of a step replaces an earlier one)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}


def test_task_rows_at_their_steps_survive_a_sigkill_and_match_the_saved_checkpoint(tiny_corpus, task_folder, tmp_path):
    """Killed just after the step-4 scores are written (checkpoint 3 saved, step 4 not), then resumed:
    the rows written before the kill are logged again identically, once each; the step-6 scores of
    the live model equal launch.eval's backend on checkpoint 6 read from disk."""
    from lm.evals import TaskSet, backend, evaluate, scores

    run_dir = tmp_path / "run"
    args = _args(tiny_corpus, run_dir, task_folder)
    proc = launch(args, tmp_path / "first.log")
    reached = wait_until(lambda: (run_dir / "metrics.jsonl").exists() and 4 in _task_rows(run_dir), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached, (tmp_path / "first.log").read_text()[-3000:]
    before = _task_rows(run_dir)
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]

    rows = _task_rows(run_dir)
    assert sorted(rows) == [2, 4, 6]  # every 2 steps, the last step included
    assert rows[2] == before[2] and rows[4] == before[4]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval/mc_local/acc" in r] == [2, 4, 6]  # once each, none left over
    keys = {"eval/mc_local/acc", "eval/mc_local/acc_norm", "eval/ppl_local/word_perplexity",
            "eval/ppl_local/byte_perplexity", "eval/ppl_local/bits_per_byte"}  # fmt: skip
    assert all(set(r) == {"step", *keys} for r in rows.values()), rows
    assert rows[2]["eval/ppl_local/word_perplexity"] != rows[6]["eval/ppl_local/word_perplexity"]  # it trains

    saved = evaluate(
        backend()(checkpoint=str(run_dir / "checkpoints" / "6"), batch_size=8),
        TaskSet(EVAL_TASKS, include_path=str(task_folder), limit=4, bootstrap_iters=0),
    )
    for key, value in scores(saved).items():
        assert rows[6][key] == pytest.approx(value, rel=1e-5), key


def test_two_processes_score_the_live_sharded_model_like_its_checkpoint(tiny_corpus, task_folder, tmp_path):
    """A launch.local_cluster run, 2 processes x 4 devices (fsdp=4 x tensor=2 across both): every process
    evaluates the tasks on the live model, process 0 writes one row, equal to the scores of the saved
    checkpoint evaluated on one device."""
    from lm.evals import TaskSet, backend, evaluate, scores

    run_dir = tmp_path / "run"
    args = _args(
        tiny_corpus, run_dir, task_folder, "train.steps=3", "train.eval_tasks_every=3", "train.eval_every=100",
        "model.n_heads=8", "model.n_kv_heads=8", "mesh.fsdp=4", "mesh.tensor=2",
    )  # fmt: skip
    cluster = ["launch.local_cluster", "--processes", "2", "--devices-per-process", "4", "--", "python", "-m"]
    out = run_cli(*cluster, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval/mc_local/acc" in r] == [3]  # one writer

    saved = evaluate(
        backend()(checkpoint=str(run_dir / "checkpoints" / "3"), batch_size=8),
        TaskSet(EVAL_TASKS, include_path=str(task_folder), limit=4, bootstrap_iters=0),
    )
    row = _task_rows(run_dir)[3]
    assert set(scores(saved)) == set(row) - {"step"}
    for key, value in scores(saved).items():
        assert row[key] == pytest.approx(value, rel=1e-5), key
