"""Running lm-evaluation-harness tasks on an nnx-lm model: task lookup, offline data, the results.

Evaluation never reaches the network: task data comes from local files (a task YAML with
`dataset_path: json`) or from the Hugging Face datasets cache, filled once beforehand (docs/eval.md).
lm_eval is an optional dependency (the `eval` extra), imported only when tasks run.
"""

import dataclasses
import difflib
import logging
import math
import os
import pathlib
import re
import sys

from lm.errors import UserError


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """Which tasks to run, and how much of each."""

    tasks: tuple[str, ...]
    include_path: str | None = None  # a folder of task YAMLs of your own
    limit: float | None = None  # documents per task (a fraction if < 1); None: all
    num_fewshot: int | None = None  # None: each task's own
    log_samples: bool = False  # keep every request and response in the results
    bootstrap_iters: int = 100_000  # lm_eval's default for standard errors; 0: none (in-loop evals)


def offline() -> None:
    """Make the Hugging Face libraries read their caches only. The environment is read when they are
    imported; a library already imported gets its constant set as well."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True


def _lm_eval():
    offline()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(
            "evaluation needs lm-evaluation-harness; install the eval extra: pip install -e '.[eval]'"
        ) from None
    from lm.evals import harness  # registers "nnx-lm" with lm_eval; needs lm_eval itself

    return harness


def task_manager(tasks: TaskSet):
    """lm_eval's TaskManager for these tasks, with every name checked. Only the include path is indexed
    when it holds them all (indexing lm_eval's ~15,000 built-in tasks takes seconds)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if tasks.include_path is not None and not pathlib.Path(tasks.include_path).is_dir():
        raise UserError(f"--include-path {tasks.include_path} is not a folder; pass a folder of task YAML files")
    if tasks.include_path is not None:
        local = TaskManager(include_path=tasks.include_path, include_defaults=False)
        if all(name in local.all_tasks for name in tasks.tasks):
            return local
    manager = TaskManager(include_path=tasks.include_path)
    for name in tasks.tasks:
        if name not in manager.all_tasks:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(near)}?" if near else "list them with `lm_eval ls tasks`"
            where = f" or in {tasks.include_path}" if tasks.include_path else ""
            raise UserError(f"unknown task {name!r}: not one of lm_eval's tasks{where}; {hint}")
    return manager


def evaluate(lm, tasks: TaskSet, *, manager=None) -> dict:
    """lm_eval.simple_evaluate on `lm` (an lm_eval model, e.g. lm.evals.harness.NnxLM): its results dict."""
    _lm_eval()
    import datasets
    from lm_eval import simple_evaluate

    manager = manager or task_manager(tasks)
    try:
        return simple_evaluate(
            model=lm, tasks=list(tasks.tasks), task_manager=manager, limit=tasks.limit,
            num_fewshot=tasks.num_fewshot, log_samples=tasks.log_samples,
            bootstrap_iters=tasks.bootstrap_iters,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,  # leave the process's RNGs alone
        )  # fmt: skip
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise _not_offline(e, tasks) from None
    except FileNotFoundError as e:
        raise UserError(
            f"task data for {', '.join(tasks.tasks)} is missing: {str(e).splitlines()[0][:200]}; "
            "check dataset_kwargs.data_files in the task YAML"
        ) from None


def _not_offline(e: Exception, tasks: TaskSet) -> UserError:
    import datasets

    found = re.search(r"reach '([^']+)'", str(e))  # datasets: "Couldn't reach '<path>' on the Hub"
    name = found.group(1) if found else "<dataset_path of the task YAML>"
    return UserError(
        f"the data of task(s) {', '.join(tasks.tasks)} ({name}) is not in the Hugging Face datasets cache "
        f"{datasets.config.HF_DATASETS_CACHE} and evaluation runs offline; fetch it there once, online, with "
        f"`python -c \"import datasets; datasets.load_dataset('{name}')\"` (add the task's dataset_name as a "
        "second argument if its YAML has one; HF_DATASETS_CACHE moves the cache)"
    )


def scores(results: dict) -> dict[str, float]:
    """{"eval/<task>/<metric>": value} from lm_eval's results: every numeric metric, no stderr. A
    metric under a filter other than "none" is eval/<task>/<metric>/<filter>."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if not filt:
                continue  # lm_eval's own bookkeeping ("alias", sample counts)
            name = f"eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")
            out[name] = float(value) if math.isfinite(value) else None
    return out


class LiveTasks:
    """Tasks on a model in memory, e.g. a training run's live model: the arrays the train step updates,
    evaluated under the run's own layout (no export, no reload, no copy). Tasks are checked and indexed
    once, at construction. In a multi-process run every process evaluates every request on the one
    mesh (as launch.eval does) and gets the same scores; process 0 writes them."""

    def __init__(self, model, tokenizer, layout, tasks: TaskSet, *, batch_size: int):
        self.tasks, self.manager = tasks, task_manager(tasks)
        self.lm = backend().of(model, tokenizer, layout, batch_size=batch_size)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the training log stays readable

    def __call__(self) -> dict[str, float]:
        return scores(evaluate(self.lm, self.tasks, manager=self.manager))


def backend():
    """The NnxLM class (registered with lm_eval as "nnx-lm")."""
    return _lm_eval().NnxLM
