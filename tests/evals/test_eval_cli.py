"""launch.eval's bad input: one line `error: ...` and exit code 2, for an unknown task, task data that
is not available offline (saying how to fetch it and where it goes), and a model folder that does
not load."""

import shutil

import pytest

HUB_TASK = """task: hub_task
dataset_path: EleutherAI/lambada_openai
dataset_name: default
output_type: loglikelihood
test_split: test
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
"""


@pytest.fixture(scope="module")
def bad(tmp_path_factory, hf_model, task_folder):
    """Folders for each kind of bad input."""
    root = tmp_path_factory.mktemp("bad")
    (root / "hub").mkdir()
    (root / "hub" / "hub_task.yaml").write_text(HUB_TASK)
    (root / "gone").mkdir()
    (root / "gone" / "gone_task.yaml").write_text(
        (task_folder / "mc_local.yaml")
        .read_text()
        .replace("mc_local", "gone_task")
        .replace("mc.jsonl", "nothing.jsonl")
    )
    (root / "weightless").mkdir()
    for f in hf_model.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, root / "weightless" / f.name)
    return root


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--hf", "{model}", "--tasks", "mc_locl", "--include-path", "{tasks}"],
         ["unknown task 'mc_locl'", "did you mean mc_local"]),
        (["--hf", "{model}", "--tasks", "hub_task", "--include-path", "{bad}/hub"],
         ["(EleutherAI/lambada_openai) is not in the Hugging Face datasets cache", "{cache}",
          "datasets.load_dataset('EleutherAI/lambada_openai')"]),
        (["--hf", "{model}", "--tasks", "gone_task", "--include-path", "{bad}/gone"], ["nothing.jsonl"]),
        (["--hf", "{bad}/weightless", "--tasks", "mc_local", "--include-path", "{tasks}"],
         ["holds no model.safetensors"]),
        (["--hf", "{bad}/nowhere", "--tasks", "mc_local", "--include-path", "{tasks}"], ["is not a folder"]),
        (["--hf", "{model}", "--tasks", "mc_local", "--include-path", "{bad}/nowhere"], ["is not a folder"]),
        (["--hf", "{model}", "--tasks", ","], ["--tasks names no task"]),
        (["--hf", "{model}", "--tasks", "mc_local", "--log-samples"], ["--log-samples needs --output"]),
        (["--hf", "{model}", "--tasks", "mc_local", "--include-path", "{tasks}", "--output", "{tasks}/mc.jsonl"],
         ["mc.jsonl already exists; pass --overwrite"]),
    ],
    ids=["unknown task", "data not cached", "data file missing", "no weights", "no folder", "no include path",
         "no task", "samples without output", "output exists"],
)  # fmt: skip
def test_bad_input_gives_one_line_and_exit_code_2(args, fragments, bad, hf_model, task_folder, hf_cache, capfd):
    import datasets

    from launch.eval import main

    where = {"{model}": str(hf_model), "{tasks}": str(task_folder), "{bad}": str(bad),
             "{cache}": str(datasets.config.HF_DATASETS_CACHE)}  # fmt: skip

    def fill(text):
        for k, v in where.items():
            text = text.replace(k, v)
        return text

    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([fill(a) for a in args])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and len(lines) == 1, err[-3000:]
    for fragment in fragments:
        assert fill(fragment) in lines[0], lines[0]
