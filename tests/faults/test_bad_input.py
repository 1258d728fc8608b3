"""Bad input, command by command: each gives exactly one line `error: ...` on stderr and exit code
2, before anything is written. The table is the one in the README ("Bad input").

The commands run in this process (their real `main`, through launch.cli.main_guard), which keeps
the table fast; tests/infer/test_generate_cli.py and tests/train/test_multihost.py run such errors as real
subprocesses; tests/evals/test_eval_cli.py has launch.eval's that need lm_eval and a model."""

import importlib
import json

import pytest

# (command, arguments, a fragment of the one line). {tmp} is a folder holding the files below.
TRAIN = ["--recipe", "stdlib_tiny", "--run-dir", "{tmp}/run"]
CASES = [
    ("train", ["--set", "optimizer.lr=0"], "optimizer.lr=0.0 must be a positive number"),
    ("train", ["--set", "optimizer.lr=nan"], "optimizer.lr=nan must be a positive number"),
    ("train", ["--set", "optimizer.b1=-0.1"], "optimizer.b1=-0.1 must be in [0, 1)"),
    ("train", ["--set", "optimizer.b2=1.5"], "optimizer.b2=1.5 must be in [0, 1)"),
    ("train", ["--set", "optimizer.eps=0"], "optimizer.eps=0.0 must be positive"),
    ("train", ["--set", "optimizer.warmup_steps=-5"], "optimizer.warmup_steps=-5 must be >= 0"),
    ("train", ["--set", "optimizer.min_lr_ratio=2"], "optimizer.min_lr_ratio=2.0 must be in [0, 1]"),
    ("train", ["--set", "optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 must be in [0, 1]"),
    ("train", ["--set", "optimizer.grad_clip=0"], "optimizer.grad_clip=0.0 must be positive, or none"),
    ("train", ["--set", "train.steps=0"], "train.steps=0 must be positive"),
    ("train", ["--set", "train.batch_size=-4"], "train.batch_size"),
    ("train", ["--set", "train.seq_len=100000"], "train.seq_len=100000 exceeds model.max_seq_len"),
    ("train", ["--set", "train.grad_accum=3"], "not divisible by train.grad_accum=3"),
    ("train", ["--set", "train.eval_every=0"], "train.eval_every=0 must be positive"),
    ("train", ["--set", "train.seed=-1"], "train.seed=-1 must be >= 0"),
    ("train", ["--set", "checkpoint.every=0"], "checkpoint.every=0 must be positive"),
    ("train", ["--set", "checkpoint.keep=0"], "checkpoint.keep=0 must be positive"),
    ("train", ["--set", "mesh.data=0"], "mesh.data=0 must be at least 1, or -1"),
    ("train", ["--set", "mesh.data=-1", "--set", "mesh.fsdp=-1"], "at most one axis"),
    ("train", ["--set", "model.dtype=float8"], "model.dtype='float8' is not one of"),
    ("train", ["--set", "model.n_heads=3"], "not divisible by model.n_kv_heads"),
    ("train", ["--set", "data.eval_fraction=1.5"], "data.eval_fraction=1.5 must be between 0 and 1"),
    ("train", ["--set", "logging.wandb=sometimes"], "logging.wandb='sometimes' is not one of"),
    ("train", ["--set", "train.stepz=5"], "unknown recipe key 'train.stepz'; did you mean train.steps"),
    ("train", ["--set", "train.steps=ten"], "train.steps expects int, got 'ten'"),
    ("train", ["--set", "train.steps"], "--set expects key.path=value"),
    ("train!", ["--recipe", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
    ("train!", ["--recipe", "{tmp}/missing.py"], "missing.py does not exist"),
    ("train!", ["--recipe", "{tmp}/empty.py"], "defines no recipe() function"),
    ("train!", [], "the following arguments are required: --recipe"),
    ("train", ["--set", 'data.inputs=["{tmp}/nothing/*.txt"]'], "nothing/*.txt"),
    ("train", ["--set", "data.dir={tmp}/unprepared", "--set", "data.inputs=[]"], "holds no prepared data"),
    ("train", ["--set", "checkpoint.dir={tmp}/empty.py"], "is a file, not a folder"),
    ("generate", ["--run-dir", "{tmp}/nowhere", "--prompt", "x"], "is not a run directory (no recipe.json)"),
    ("generate", ["--run-dir", "{tmp}/garbled", "--prompt", "x"], "recipe.json is not valid JSON"),
    ("generate", ["--checkpoint", "{tmp}/nowhere/3", "--prompt", "x"], "does not exist"),
    (
        "generate",
        ["--checkpoint", "{tmp}/garbled/checkpoints/6.orbax-checkpoint-tmp-1", "--prompt", "x"],
        "not a finished step",
    ),
    ("generate", ["--run-dir", "{tmp}/unfinished", "--prompt", "x"], "holds no finished checkpoint"),
    (
        "generate",
        ["--run-dir", "{tmp}/garbled", "--prompt", "x", "--batch-size", "0"],
        "--batch-size=0 must be at least 1",
    ),
    ("generate", ["--run-dir", "{tmp}/garbled"], "give --prompt, --prompts-file or --interactive"),
    ("prepare", ["--input", "{tmp}/nothing/*.txt", "--out", "{tmp}/out"], "nothing/*.txt"),
    ("prepare", ["--input", "{tmp}/empty.py", "--out", "{tmp}/out", "--eval-fraction", "2"], "eval_fraction=2.0"),
    (
        "bench",
        ["train", "--recipe", "stdlib_tiny", "--json", "{tmp}/b.json", "--set", "optimizer.b2=1.5"],
        "optimizer.b2",
    ),
    ("bench", ["nonsense", "--recipe", "stdlib_tiny", "--json", "{tmp}/b.json"], "invalid choice: 'nonsense'"),
    ("local_cluster", ["--processes", "0", "--devices-per-process", "1", "--", "true"], "--processes=0"),
    ("local_cluster", ["--processes", "2", "--devices-per-process", "1"], "put the command to run after --"),
    (
        "local_cluster",
        ["--processes", "2", "--devices-per-process", "1", "--timeout", "0", "--", "true"],
        "--timeout=0",
    ),
    ("convert", ["--run-dir", "{tmp}/nowhere", "--hf-out", "{tmp}/hf"], "is not a run directory"),
    ("score", ["--run-dir", "{tmp}/nowhere", "--input", "{tmp}/empty.py"], "is not a run directory"),
    ("eval", ["--hf", "{tmp}/nowhere", "--tasks", ","], "--tasks names no task"),
    ("eval", ["--hf", "{tmp}/nowhere", "--tasks", "a", "--log-samples"], "--log-samples needs --output"),
    ("eval", ["--hf", "{tmp}/nowhere", "--tasks", "a", "--limit", "0"], "--limit=0.0 must be positive"),
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "recipe.json").write_text("{")
    (tmp_path / "garbled" / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir(parents=True)
    (tmp_path / "unfinished" / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir(parents=True)
    (tmp_path / "unfinished" / "recipe.json").write_text(json.dumps({"name": "x"}))
    (tmp_path / "unprepared").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "command, args, fragment",
    CASES,
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_input_gives_one_line_and_exit_code_2(command, args, fragment, files, capsys):
    name = command.rstrip("!")
    argv = (TRAIN if command == "train" else []) + args
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    main = importlib.import_module(f"launch.{name}").main
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment.replace("{tmp}", str(files)) in lines[0], lines[0]
    assert not (files / "run").exists(), "nothing is written for bad input"


def test_the_table_covers_every_command_with_at_least_25_bad_values():
    commands = {c.rstrip("!") for c, _, _ in CASES}
    assert commands >= {"train", "generate", "prepare", "bench", "local_cluster"}
    assert len(CASES) >= 25
