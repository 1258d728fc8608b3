"""Evaluation with lm-evaluation-harness: nnx-lm as an lm_eval model ("nnx-lm", lm.evals.harness),
the tasks run offline (lm.evals.tasks), and scores for the training loop."""

from lm.evals.tasks import LiveTasks, TaskSet, backend, evaluate, scores, task_manager
