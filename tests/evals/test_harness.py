"""nnx-lm's lm_eval backend against lm_eval's own hf backend on the same tiny Llama: every request
(loglikelihood, loglikelihood_rolling, generate_until) and every task metric, on one device and
sharded over 8 fake CPU devices (tensor x fsdp) through launch.eval."""

import json
import math
import os
import shlex
import subprocess
import sys

import pytest
from eval_tasks import TASKS
from helpers import ROOT

from lm.evals import TaskSet, backend, evaluate

TOLERANCE = 1e-4  # nats, per request


def assert_same_as_hf(ours: dict, ref: dict) -> None:
    """Per request: log-likelihoods within TOLERANCE with the same greedy flags, the same generated
    text; per task: the same metrics (perplexities to float precision)."""
    for task in TASKS:
        a, b = ours["samples"][task], ref["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for sa, sb in zip(a, b):
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                if isinstance(rb[0], str):
                    assert ra[0] == rb[0], (task, sa["doc_id"], ra, rb)
                elif isinstance(rb[0], list | tuple):  # (log p, greedy)
                    assert abs(ra[0][0] - rb[0][0]) <= TOLERANCE and bool(ra[0][1]) == bool(rb[0][1]), (task, ra, rb)
                else:  # a rolling log-likelihood
                    assert abs(ra[0] - rb[0]) <= TOLERANCE, (task, ra, rb)
    for task in TASKS:
        for key, value in ref["results"][task].items():
            if "_stderr" in key:
                continue
            if key.split(",")[0] in ("acc", "acc_norm", "exact_match"):
                assert ours["results"][task][key] == value, (task, key)
            elif "perplexity" in key or "bits_per_byte" in key:
                assert math.isclose(ours["results"][task][key], value, rel_tol=1e-6), (task, key)


def test_the_reference_exercises_what_it_should(hf_reference):
    """Several windows per rolling text, several choices per question, some non-empty generations."""
    ppl = hf_reference["samples"]["ppl_local"]
    assert len(ppl) == 6 and hf_reference["results"]["ppl_local"]["word_perplexity,none"] > 1
    assert all(len(s["arguments"]) == 4 for s in hf_reference["samples"]["mc_local"])
    assert any(s["resps"][0][0] for s in hf_reference["samples"]["qa_local"])


@pytest.fixture(scope="module")
def ours(hf_model):
    """One backend for the tests below (what they compile is shared), made as lm_eval makes a model
    it is given by name: from its registry, with a model_args string."""
    from lm_eval.api.registry import get_model

    registered = backend()  # importing lm.evals' backend registers it
    assert get_model("nnx-lm") is registered
    return get_model("nnx-lm").create_from_arg_string(f"hf={hf_model},batch_size=4", {"device": None})


def test_loglikelihoods_generations_and_metrics_equal_the_hf_backend(ours, task_folder, hf_reference):
    results = evaluate(
        ours,
        TaskSet(TASKS, include_path=str(task_folder), log_samples=True, bootstrap_iters=0),
    )
    assert_same_as_hf(results, hf_reference)


def _instance(kind, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def test_requests_one_by_one_match_hf_stops_limits_empty_context_and_sampling(ours, hf_model):
    """Requests the tasks do not cover: an empty context, max_gen_toks, stop strings that cut; and
    sampled decoding (seeded: the same text twice, not the greedy text)."""
    from lm_eval.api.registry import get_model

    hf = get_model("hf")(pretrained=str(hf_model), batch_size=4, device="cpu", dtype="float32")
    ll = [("", " the cat sat"), ("the cat", " sat on a mat"), ("a bird ", "sang")]
    got = ours.loglikelihood([_instance("loglikelihood", a) for a in ll])
    want = hf.loglikelihood([_instance("loglikelihood", a) for a in ll])
    assert all(abs(g[0] - w[0]) <= TOLERANCE and g[1] == w[1] for g, w in zip(got, want)), (got, want)

    prompts = ["the cat sat on", "a bird sang in the tall", "river"]
    greedy = hf.generate_until([_instance("generate_until", (p, {"until": [], "max_gen_toks": 12})) for p in prompts])
    assert ours.generate_until([_instance("generate_until", (p, {"max_gen_toks": 12})) for p in prompts]) == greedy
    short = [_instance("generate_until", (p, {"until": [], "max_gen_toks": 3})) for p in prompts]
    assert ours.generate_until(short) == hf.generate_until(short)
    # A stop string taken from the greedy text itself, so it really cuts.
    stop = next(g[len(g) // 2 :][:2] for g in greedy if len(g) >= 4)
    cut = [_instance("generate_until", (p, {"until": [stop], "max_gen_toks": 12})) for p in prompts]
    cut_ours = ours.generate_until(cut)
    assert cut_ours == hf.generate_until(cut) and any(len(c) < len(g) for c, g in zip(cut_ours, greedy))
    assert all(stop not in c for c in cut_ours)

    sampled = [
        _instance("generate_until", (p, {"do_sample": True, "temperature": 1.0, "max_gen_toks": 12})) for p in prompts
    ]
    first, again = ours.generate_until(sampled), ours.generate_until(sampled)
    assert first == again and first != greedy


def _eval_args(hf_model, task_folder) -> list[str]:
    return [sys.executable, "-m", "launch.eval", "--hf", str(hf_model), "--tasks", ",".join(TASKS),
            "--include-path", str(task_folder), "--tensor", "2", "--batch-size", "4", "--log-samples"]  # fmt: skip


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def eight_devices(hf_model, task_folder, tmp_path_factory):
    """launch.eval on one process of 8 fake CPU devices, weights split over tensor=2 x fsdp=4 and each
    batch over fsdp: its stdout and results JSON."""
    out = tmp_path_factory.mktemp("eight") / "results.json"
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = _run([*_eval_args(hf_model, task_folder), "--fsdp", "4", "--output", str(out)], eight)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_launch_eval_sharded_over_tensor_and_fsdp_equals_the_hf_backend(eight_devices, hf_reference):
    """The same requests and metrics as lm_eval's hf backend; it prints lm_eval's table and writes its JSON."""
    stdout, results = eight_devices
    assert "'fsdp': 4" in stdout and "'tensor': 2" in stdout, stdout
    assert "|  Tasks  |" in stdout and "word_perplexity" in stdout, stdout
    assert_same_as_hf(results, hf_reference)


@pytest.mark.slow
def test_launch_eval_on_two_processes_of_four_devices_equals_one_process_of_eight(
    eight_devices, hf_model, task_folder, hf_reference, tmp_path
):
    """launch.local_cluster, 2 processes x 4 devices, one mesh of 8 (fsdp=4 x tensor=2 across both):
    every process runs every request; process 0 alone prints the table and writes --output (each
    process is given its own path, so a second writer would show), with the requests and metrics of
    one process of 8 devices."""
    cluster = [sys.executable, "-m", "launch.local_cluster", "--processes", "2", "--devices-per-process", "4", "--"]
    each = f"exec {shlex.join(_eval_args(hf_model, task_folder))} --output {tmp_path}/results$NNXLM_PROCESS_ID.json"
    run = _run([*cluster, "sh", "-c", each], {})
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results0.json"]
    assert "'fsdp': 4" in run.stdout and "'tensor': 2" in run.stdout, run.stdout[-3000:]  # the mesh of one process
    assert "[p0] |  Tasks  |" in run.stdout and "|  Tasks  |" not in run.stdout.replace("[p0] |  Tasks  |", "")
    two = json.loads((tmp_path / "results0.json").read_text())
    one = eight_devices[1]
    assert_same_as_hf(two, one)
    assert_same_as_hf(two, hf_reference)
