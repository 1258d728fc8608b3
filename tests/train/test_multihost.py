"""Multi-process runs, rehearsed on one machine: start-up detection, the per-process data split,
launch.local_cluster against one process with 8 devices, resume after a kill, and no silent hangs."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, losses, run_cli, tiny_train_args

from launch.distributed import Launch, detect
from lm.errors import UserError

# The same mesh, (data, fsdp, tensor) = (1, 4, 2), over 1 process x 8 devices and 2 processes x 4.
# Eight kv heads, so that a tensor axis of 8 (across both processes) divides them too.
SETS = (
    *("model.n_heads=8", "model.n_kv_heads=8", "mesh.fsdp=4", "mesh.tensor=2"),
    *("train.log_every=1", "train.eval_every=100", "train.sample_tokens=0"),
)


def cluster(processes: int, devices: int, *command: str, timeout: int = 60, grace: float = 30) -> list[str]:
    return [
        "launch.local_cluster",
        "--processes",
        str(processes),
        "--devices-per-process",
        str(devices),
        "--timeout",
        str(timeout),
        "--grace",
        str(grace),
        "--",
        "python",
        "-m",
        *command,
    ]


def start(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, "the run ended before the awaited moment"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def child_pids(log_path) -> dict[int, int]:
    match = re.search(r"pids (p0=\d+(?:, p\d+=\d+)*)", log_path.read_text())
    return {int(k[1:]): int(v) for k, v in (item.split("=") for item in match.group(1).split(", "))} if match else {}


EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.fixture(scope="module")
def one_process_run(tiny_corpus, tmp_path_factory):
    """The reference run: one process with 8 fake CPU devices."""
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    out = run_cli(*tiny_train_args(tiny_corpus, run_dir, *SETS), env=EIGHT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "over 8 cpu devices; 1 process(es)" in out.stdout + out.stderr
    return run_dir


@pytest.fixture(scope="module")
def one_process(one_process_run) -> dict[int, float]:
    """Losses of the reference run."""
    return losses(one_process_run)


# ------------------------------------------------------------------------------------------------
# Start-up detection (no processes started)


def test_single_process_when_nothing_says_otherwise():
    assert detect({}, on_cloud_tpu=lambda: False) == Launch()
    # An sbatch script run without srun has SLURM_NTASKS but no job step: still one process.
    batch_script = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert detect(batch_script, on_cloud_tpu=lambda: False).source is None


def test_explicit_flags_win_over_the_environment():
    env = {"NNXLM_COORDINATOR": "10.0.0.1:1234", "NNXLM_NUM_PROCESSES": "4", "NNXLM_PROCESS_ID": "3"}
    assert detect(env) == Launch("env", "10.0.0.1:1234", 4, 3)
    launch = detect(env, process_id=1, timeout=7)
    assert (launch.source, launch.process_id, launch.timeout) == ("flags", 1, 7)
    assert detect({**env, "NNXLM_DISTRIBUTED_TIMEOUT": "9", "NNXLM_CPU_DEVICES": "4"}).timeout == 9
    assert detect({**env, "NNXLM_CPU_DEVICES": "4"}).cpu_devices == 4
    assert detect({**env, "NNXLM_DISTRIBUTED": "off"}).source is None


@pytest.mark.parametrize(
    "env, on_tpu, source",
    [
        (
            {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16"}
            | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
            False,
            "slurm",
        ),
        ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, False, "mpi"),
        ({}, True, "tpu"),
        ({"NNXLM_DISTRIBUTED": "on"}, False, "forced"),
    ],
)
def test_cluster_environments_are_detected(env, on_tpu, source):
    launch = detect(env, on_cloud_tpu=lambda: on_tpu)
    # Coordinator, count and index are left to jax.distributed's own detection.
    assert launch.source == source and launch.coordinator is None and launch.process_id is None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNXLM_COORDINATOR": "10.0.0.1:1234"}, "--num-processes, --process-id is missing"),
        ({"NNXLM_COORDINATOR": "10.0.0.1", "NNXLM_NUM_PROCESSES": "2", "NNXLM_PROCESS_ID": "0"}, "HOST:PORT"),
        ({"NNXLM_COORDINATOR": "h:1", "NNXLM_NUM_PROCESSES": "2", "NNXLM_PROCESS_ID": "2"}, "must be in 0..1"),
        ({"NNXLM_DISTRIBUTED_TIMEOUT": "0"}, "must be at least 1"),
        ({"NNXLM_DISTRIBUTED": "maybe"}, "auto, on or off"),
    ],
)
def test_bad_start_up_settings_are_user_errors(env, message):
    with pytest.raises(UserError, match=re.escape(message)):
        detect(env, on_cloud_tpu=lambda: False)


def test_bad_start_up_flags_are_one_line_errors():
    out = run_cli("launch.train", "--recipe", "stdlib_tiny", "--coordinator", "127.0.0.1:1", "--process-id", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --coordinator, --num-processes and --process-id")


# ------------------------------------------------------------------------------------------------
# The data split


def _token_file(tmp_path):
    from lm.data import write_tokens

    class Letters:  # one id per letter: enough for distinct windows, no tokenizer training
        path, eos_id, vocab_size = None, 3, 64

        def encode(self, text):
            return [ord(c) - ord("a") + 4 for c in text]

    rng = random.Random(0)
    docs = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(1, 40))) for _ in range(150)]
    return write_tokens(docs, Letters(), tmp_path, "train", workers=1)


def test_each_process_reads_only_its_own_disjoint_rows(tmp_path, monkeypatch):
    from lm.data import PackedWindows, make_dataset

    token_file = _token_file(tmp_path)
    read: list[int] = []
    getitem = PackedWindows.__getitem__
    monkeypatch.setattr(PackedWindows, "__getitem__", lambda self, i: read.append(i) or getitem(self, i))

    def epoch(process_index: int, process_count: int) -> tuple[list[dict], list[int]]:
        read.clear()
        rows = range(process_index * 8 // process_count, (process_index + 1) * 8 // process_count)
        ds = make_dataset(token_file, 6, 8, seed=3, rows=rows, num_epochs=1)
        return list(ds), list(read)

    whole, whole_rows = epoch(0, 1)
    (first, rows0), (second, rows1) = epoch(0, 2), epoch(1, 2)
    assert set(rows0).isdisjoint(rows1) and len(set(rows0)) == len(rows0) == 4 * len(first)
    # Together the two processes read exactly what one process reads, and each step's halves,
    # process 0's then process 1's, are that step's global batch.
    assert sorted(rows0 + rows1) == sorted(whole_rows)
    assert len(first) == len(second) == len(whole)
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[step][key], second[step][key]]), batch[key])


def test_data_iterator_state_carries_over_to_another_process_count(tmp_path):
    """A run saved by P processes can resume on P': each process's saved state is the global step."""
    from lm.data import make_dataset

    token_file = _token_file(tmp_path)
    dataset = lambda p, n: make_dataset(token_file, 6, 8, seed=3, rows=range(p * 8 // n, (p + 1) * 8 // n))
    saved = iter(dataset(1, 2))
    for _ in range(3):
        next(saved)
    state = saved.get_state()
    reference = iter(dataset(0, 1))
    step3 = [next(reference) for _ in range(4)][3]["tokens"]
    for p, n in [(0, 1), (2, 4), (1, 2)]:
        resumed = iter(dataset(p, n))
        resumed.set_state(state)
        rows = 8 // n
        np.testing.assert_array_equal(next(resumed)["tokens"], step3[p * rows : (p + 1) * rows])


# ------------------------------------------------------------------------------------------------
# Real processes


@pytest.mark.slow
def test_two_processes_of_four_devices_give_the_losses_of_one_process_of_eight(tiny_corpus, tmp_path, one_process):
    """Here on mesh (1, 2, 4), against the reference's (1, 4, 2) (the resume test keeps the same mesh)."""
    run_dir = tmp_path / "run"
    out = run_cli(*cluster(2, 4, *tiny_train_args(tiny_corpus, run_dir, *SETS, "mesh.fsdp=2", "mesh.tensor=4")))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "[p0] model:" in text and "over 8 cpu devices; 2 process(es)" in text
    assert "[p1] model:" not in text, "only process 0 reports progress"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1, "only process 0 writes metrics.jsonl"
    two = losses(run_dir)
    assert sorted(two) == sorted(one_process) == list(range(1, 7))
    for step in two:  # collectives over gloo and another mesh sum in another order: float32 rounding
        assert two[step] == pytest.approx(one_process[step], rel=1e-5, abs=0), step


@pytest.mark.slow
def test_a_tensor_axis_across_processes_trains_like_one_process(tiny_corpus, tmp_path, one_process):
    """mesh.tensor=8 over 2 processes x 4 devices: each process loads the rows its devices hold, so
    both processes of the one tensor group read the same rows. The losses are those of one process
    of 8 devices (mesh (1, 4, 2)): the mesh changes only the order of float32 sums."""
    run_dir = tmp_path / "run"
    tensor8 = ("mesh.fsdp=1", "mesh.tensor=8", "train.steps=3")
    out = run_cli(*cluster(2, 4, *tiny_train_args(tiny_corpus, run_dir, *SETS, *tensor8)))
    assert out.returncode == 0, out.stderr[-3000:]
    two = losses(run_dir)
    assert sorted(two) == [1, 2, 3]
    for step in two:
        assert two[step] == pytest.approx(one_process[step], rel=1e-5, abs=0), step


@pytest.mark.slow
def test_inference_on_two_processes_of_four_devices_equals_one_process_of_eight(one_process_run, tiny_corpus, tmp_path):
    """generate (mesh tensor=8), score (fsdp=4 x tensor=2 on 2x4) and convert --hf-out (fsdp=2 x tensor=4)
    joined across 2 processes: one output file each, written by process 0, equal to 1 process x 8
    devices: the same tokens, the same NLL, the same safetensors bit for bit."""
    run, text = one_process_run, sorted(tiny_corpus.glob("*.txt"))[0]
    py = sys.executable
    script = tmp_path / "infer.sh"
    script.write_text(
        "set -e\n"
        f"{py} -m launch.generate --run-dir {run} --prompt 'def f' --prompt 'import os' --prompt 'x = 1' "
        '--max-new-tokens 8 --tensor 8 --batch-size 2 --output "$OUT/gen.jsonl"\n'
        f'{py} -m launch.score --run-dir {run} --input {text} --tensor 2 --json > "$OUT/score$NNXLM_PROCESS_ID.json"\n'
        f'{py} -m launch.convert --run-dir {run} --hf-out "$OUT/hf" --tensor 4\n'
    )
    results = {}
    for name in ("one", "two"):
        out_dir = tmp_path / name
        out_dir.mkdir()
        env = {**os.environ, "OUT": str(out_dir), "PYTHONUNBUFFERED": "1"}
        if name == "one":
            command, env = ["bash", str(script)], {**env, **EIGHT, "NNXLM_PROCESS_ID": ""}
        else:
            command = [py, "-m", "launch.local_cluster", "--processes", "2", "--devices-per-process", "4", "--"]
            command += ["bash", str(script)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = out_dir
    one, two = results["one"], results["two"]
    assert sorted(p.name for p in two.iterdir()) == ["gen.jsonl", "hf", "score0.json", "score1.json"]
    # gloo itself prints connection lines on stdout; the score is the one JSON line
    scores = lambda f: [json.loads(line) for line in f.read_text().splitlines() if line.startswith("{")]
    assert scores(two / "score1.json") == [], "only process 0 prints"
    tokens = lambda d: [json.loads(line)["tokens"] for line in (d / "gen.jsonl").read_text().splitlines()]
    assert len(tokens(two)) == 3 and tokens(two) == tokens(one)
    nll = lambda f: scores(f)[-1]["mean_nll"]
    assert nll(two / "score0.json") == pytest.approx(nll(one / "score.json"), rel=1e-5)
    assert sorted(p.name for p in (two / "hf").iterdir()) == sorted(p.name for p in (one / "hf").iterdir())
    assert (two / "hf" / "model.safetensors").read_bytes() == (one / "hf" / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("relaunch", ["2x4", "1x8"])
def test_killed_multiprocess_run_resumes_from_its_checkpoint(tiny_corpus, tmp_path, one_process, relaunch):
    """Kill both processes after checkpoint 3; relaunch on 2 processes, or on 1 (another host count)."""
    run_dir = tmp_path / "run"
    args = cluster(2, 4, *tiny_train_args(tiny_corpus, run_dir, *SETS))  # checkpoint.every=3 of 6 steps
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        proc = start(args, log)
        try:
            wait_for(lambda: (run_dir / "checkpoints" / "3").is_dir(), proc)
            for pid in child_pids(log_path).values():  # both 'hosts' die at once, with no chance to save
                os.kill(pid, signal.SIGKILL)
            assert proc.wait(timeout=60) != 0
        finally:
            proc.kill()
    interrupted_at = max(losses(run_dir))
    assert 3 <= interrupted_at < 6, "the run finished before it could be interrupted"

    if relaunch == "2x4":
        out = run_cli(*args)
    else:
        out = run_cli(*tiny_train_args(tiny_corpus, run_dir, *SETS), env=EIGHT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr
    resumed = losses(run_dir)
    for step in range(4, 7):  # recomputed after the restart from checkpoint 3
        assert resumed[step] == pytest.approx(one_process[step], rel=1e-6, abs=0), step


@pytest.mark.slow
def test_killing_one_process_stops_the_other_within_the_timeout(tiny_corpus, tmp_path):
    timeout = 10
    run_dir = tmp_path / "run"
    # A grace longer than the test: the survivor must stop by itself (jax.distributed), not be stopped.
    args = cluster(2, 4, *tiny_train_args(tiny_corpus, run_dir, *SETS, "train.steps=500"), timeout=timeout, grace=600)
    log_path = tmp_path / "cluster.log"
    with log_path.open("w") as log:
        proc = start(args, log)
        try:
            metrics = run_dir / "metrics.jsonl"
            wait_for(lambda: metrics.exists() and '"loss"' in metrics.read_text(), proc)  # training is under way
            os.kill(child_pids(log_path)[1], signal.SIGKILL)
            killed_at = time.monotonic()
            code = proc.wait(timeout=timeout + 50)
            took = time.monotonic() - killed_at
        finally:
            proc.kill()
    text = log_path.read_text()
    assert code != 0 and "[local_cluster] process 1 was killed by SIGKILL" in text
    assert re.search(r"\[local_cluster\] process 0 (was killed by SIGABRT|exited with code [1-9])", text), text[-3000:]
    assert "another task died" in text or "heartbeat" in text
    assert took < timeout + 10, f"process 0 took {took:.1f} s to stop"


@pytest.mark.slow
def test_a_process_that_never_arrives_is_an_error_within_the_timeout(tiny_corpus, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "NNXLM_COORDINATOR": f"127.0.0.1:{port}",
        "NNXLM_NUM_PROCESSES": "2",
        "NNXLM_PROCESS_ID": "0",
        "NNXLM_CPU_DEVICES": "4",
        "NNXLM_DISTRIBUTED_TIMEOUT": "4",
        "JAX_PLATFORMS": "cpu",
    }
    began = time.monotonic()
    out = run_cli(*tiny_train_args(tiny_corpus, tmp_path / "run", *SETS), env=env, timeout=120)
    took = time.monotonic() - began
    assert out.returncode != 0 and "[process 0/2] joining the run" in out.stderr
    assert took < 4 + 20, f"took {took:.0f} s"  # start-up, the timeout, then the runtime's abort


@pytest.mark.slow
def test_an_srun_step_is_detected_and_joined(tmp_path):
    """Two processes with the variables srun sets: jax.distributed finds coordinator, count and index."""
    for port in random.sample(range(61440, 65536), 200):  # jax derives the port from the job id
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    script = (
        "from launch.distributed import initialize_from_env_or_flags as init; launch = init(); import jax; "
        "print(launch.source, jax.process_index(), jax.process_count(), jax.device_count())"
    )
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "SLURM_JOB_ID": str(port - 61440),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(i),
            "SLURM_LOCALID": str(i),
            "NNXLM_CPU_DEVICES": "2",
            "NNXLM_DISTRIBUTED_TIMEOUT": "30",
            "JAX_PLATFORMS": "cpu",
        }
        procs.append(
            subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=90)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == ["slurm 0 2 4", "slurm 1 2 4"]


# ------------------------------------------------------------------------------------------------
# Launch scripts


def test_launch_scripts_parse_and_show_their_commands():
    for script in ("launch/tpu_pod.sh", "launch/slurm.sbatch"):
        assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0, script
    out = subprocess.run(
        [
            "bash",
            "launch/tpu_pod.sh",
            "run",
            "--dry-run",
            "--name",
            "pod",
            "--zone",
            "us-east5-b",
            "--type",
            "v6e-16",
            "--",
            "python",
            "-m",
            "launch.train",
            "--recipe",
            "stdlib_tiny",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "gcloud compute tpus tpu-vm create pod --zone=us-east5-b --accelerator-type=v6e-16" in out.stdout
    assert "--version=v2-alpha-tpuv6e" in out.stdout
    assert "gcloud compute tpus tpu-vm ssh pod --zone=us-east5-b --worker=all --command=" in out.stdout
    assert "python -m launch.train --recipe stdlib_tiny" in out.stdout
