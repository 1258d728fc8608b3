"""Fixtures for the lm_eval tests: a Hugging Face cache in a temporary folder (offline), a tiny
random Llama with a tokenizer trained here, the local tasks, and lm_eval's own hf backend's results."""

import os
import sys

import pytest

pytest.importorskip("lm_eval")


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """HF_HOME and the datasets cache in a temporary folder, offline; put back afterwards."""
    home = tmp_path_factory.mktemp("hf_home")
    env = {
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if "datasets" in sys.modules:  # imported earlier in this session: its cache path is already read
        sys.modules["datasets"].config.HF_DATASETS_CACHE = env["HF_DATASETS_CACHE"]
    yield home
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory, hf_cache):
    from hf_builders import bpe_folder, tiny_llama

    root = tmp_path_factory.mktemp("eval_model")
    return tiny_llama(root / "model", bpe_folder(root / "tokenizer", gpt2=False))


@pytest.fixture(scope="session")
def task_folder(tmp_path_factory, hf_cache):
    from eval_tasks import write_tasks

    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="session")
def hf_reference(hf_model, task_folder):
    """lm_eval's hf backend on the three tasks, every request and response kept."""
    from eval_tasks import TASKS
    from lm_eval.api.registry import get_model

    from lm.evals import TaskSet, evaluate

    hf = get_model("hf")(pretrained=str(hf_model), batch_size=4, device="cpu", dtype="float32")
    return evaluate(hf, TaskSet(TASKS, include_path=str(task_folder), log_samples=True, bootstrap_iters=0))
