"""Training: set up a run (lm.train.run), then the step loop: train, log, evaluate, checkpoint, and
stop cleanly on preemption; then a sample from the trained model."""

import dataclasses
import math
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

from lm import lora
from lm.config import Recipe
from lm.evals import LiveTasks, TaskSet
from lm.hardware import peak_tflops_per_device
from lm.infer.decode import generate
from lm.infer.sampling import Sampling
from lm.state.agree import agreed
from lm.state.optimizer import learning_rate
from lm.state.source import InitSource
from lm.train.faults import NonFiniteGuard, Preemption
from lm.train.preference_run import LOGGED, GrpoStepper, dpo_stepper
from lm.train.profile import StepProfiler
from lm.train.run import Run, say, setup
from lm.train.step import eval_step, train_step
from sharding.mesh import Layout
from sharding.partition import put_batch


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished (or preempted) call of `train` reports."""

    last: dict  # the last logged metrics row (step, loss, lr, grad_norm, tokens_per_s, ...; eval_loss after an eval)
    initial_eval_loss: float | None  # the untrained model's eval loss (fresh runs only)
    preempted: int | None  # the step saved on preemption
    start_step: int  # the step the run resumed from (0: fresh)
    params: int  # what trained: every parameter, or the adapters
    sample: str = ""  # a generated sample from the trained model

    @property
    def step(self) -> int | None:
        return self.last.get("step")


@dataclasses.dataclass(frozen=True)
class _Outcome:
    last: dict
    initial_eval: float | None
    preempted: int | None


def split_rows(local: dict, k: int) -> list[dict]:
    """A process's rows as k microbatches, microbatch i taking rows i, i+k, ... (as train_step does)."""
    return [local] if k == 1 else [{name: v[i::k] for name, v in local.items()} for i in range(k)]


def eval_loss(model, batches, layout: Layout, microbatches: int = 1) -> float:
    """Mean token loss over the eval batches, run in the training step's microbatches: evaluating a
    whole global batch at once would need the memory that train.grad_accum exists to avoid."""
    total, weight = 0.0, 0.0
    for local in batches:
        for part in split_rows(local, microbatches):
            s, w = eval_step(model, put_batch(part, layout))
            total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)


def train(recipe: Recipe, run_dir: str | pathlib.Path, *, source: InitSource | None = None) -> TrainResult:
    """Train (or resume) the run in run_dir. `source`: init.from, resolved by the caller."""
    run = setup(recipe, pathlib.Path(run_dir), source)
    t = run.recipe.train
    preemption, guard = Preemption(), NonFiniteGuard(t.max_bad_steps)
    with run.layout:
        try:
            outcome = _loop(run, preemption, guard)
            run.ckpt.wait()  # the last save reaches the disk (or its error is raised) before we report
        finally:
            preemption.close()
            run.ckpt.close()  # waits for a save in flight: a failure elsewhere never costs a checkpoint
        if guard.skipped:
            say(f"skipped {len(guard.skipped)} non-finite step(s): {guard.skipped}")
        sample = _sample(run) if outcome.preempted is None else ""
    run.log.close()
    return TrainResult(
        last=outcome.last, initial_eval_loss=outcome.initial_eval, preempted=outcome.preempted,
        start_step=run.start, params=run.n_params, sample=sample,
    )  # fmt: skip


def _sample(run: Run) -> str:
    """train.sample_tokens from train.sample_prompt, sampled (temperature 0.7, top-k 40)."""
    t, tokenizer = run.recipe.train, run.tokenizer
    prompt = tokenizer.encode(t.sample_prompt)
    n = min(t.sample_tokens, run.recipe.model.max_seq_len - len(prompt))  # a prompt near the context gets fewer
    if not prompt or n <= 0:
        return ""
    out = generate(
        run.model, [prompt], max_new_tokens=n, sampling=Sampling(temperature=0.7, top_k=40), seed=t.seed,
        eos_id=tokenizer.eos_id,
    )  # fmt: skip
    return t.sample_prompt + tokenizer.decode([i for i in out.tokens[0] if i != tokenizer.eos_id])


def _live_tasks(run: Run) -> LiveTasks | None:
    """train.eval_tasks on the live model, in the train step's microbatch size (its memory is known to fit)."""
    t = run.recipe.train
    if not t.eval_tasks:
        return None
    tasks = TaskSet(tuple(t.eval_tasks), include_path=t.eval_include_path, limit=t.eval_tasks_limit, bootstrap_iters=0)
    return LiveTasks(run.model, run.tokenizer, run.layout, tasks, batch_size=max(1, t.batch_size // t.grad_accum))


def _loop(run: Run, preemption: Preemption, guard: NonFiniteGuard) -> _Outcome:
    """The step loop: train, log, evaluate, checkpoint; stop cleanly on preemption."""
    t, m, ckpt = run.recipe.train, run.recipe.model, run.ckpt
    lr = learning_rate(run.recipe.optimizer, t.steps)
    tokens_per_step = t.batch_size * t.seq_len * (2 if t.objective == "dpo" else 1)  # dpo: chosen and rejected rows
    adapters = lora.computed(run.model) if run.recipe.lora.rank else None  # frozen weights: no weight gradient
    flops_per_token = m.flops_per_token(t.seq_len, adapter_params=adapters)
    flops_per_step = flops_per_token * tokens_per_step
    maxtext_ratio = m.flops_per_token(t.seq_len, "maxtext", adapter_params=adapters) / flops_per_token
    peak, peak_source = peak_tflops_per_device(t.peak_tflops)
    count = "6N" if adapters is None else "4N (frozen base: no weight gradients) + 6 x adapters"
    say(f"MFU: {count} + 12*L*T*H*D FLOPs per token (PaLM), peak {peak:.2f} TFLOP/s per device from {peak_source}")
    profiler = StepProfiler(t.profile_range, run.run_dir / "profile", settle=ckpt.wait)

    def evaluate(step: int) -> dict:
        el = eval_loss(run.model, run.eval_batches, run.layout, t.grad_accum)
        row = {"step": step, "eval_loss": el, "eval_ppl": math.exp(min(el, 50.0))}
        run.log.write(row)
        say(f"step {step}: eval loss {el:.3f}, perplexity {row['eval_ppl']:.1f}")
        return row

    def save(step: int, force: bool = False) -> None:
        guard.check(ckpt.latest_step(), str(ckpt.directory))  # never checkpoint a non-finite state
        ckpt.save(step, run.model, run.optimizer, run.train_iter, run.meta, force=force)

    tasks = _live_tasks(run)

    def evaluate_tasks(step: int) -> dict:
        row = {"step": step, **tasks()}
        run.log.write(row)
        say(f"step {step}: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in row.items() if k != "step" and v is not None))
        return row

    sft = t.objective == "sft"
    grpo = GrpoStepper(run, say) if t.objective == "grpo" else None
    step_fn = dpo_stepper(run) if t.objective == "dpo" else grpo
    # The untrained model's eval loss: the starting point that later evals are measured against.
    initial_eval = evaluate(0)["eval_loss"] if run.start == 0 and sft else None
    last = {}
    bar = tqdm(total=t.steps, initial=run.start, disable=jax.process_index() != 0, dynamic_ncols=True, desc="train")
    try:
        timer, timed_steps = time.perf_counter(), 0
        for step in range(run.start + 1, t.steps + 1):
            profiler.before(step)
            if sft:
                batch = put_batch(next(run.train_iter), run.layout)
                metrics = train_step(run.model, run.optimizer, batch, grad_accum=t.grad_accum)
            else:
                metrics = step_fn(step)
            profiler.after(step, metrics)
            guard.add(step, metrics)
            log_step = step % t.log_every == 0 or step == t.steps
            if jax.process_count() == 1 or log_step:
                # A background save that failed stops the run now, not at the next save. Several
                # processes compare notes at log steps only, where they synchronise anyway.
                agreed(ckpt.check)
            timed_steps += 1
            if step == run.start + 1:  # the first step compiles; time from the end of it
                jax.block_until_ready(metrics)
                timer, timed_steps = time.perf_counter(), 0
            bar.update(1)
            if log_step:
                guard.check(ckpt.latest_step(), str(ckpt.directory))
                metrics = jax.device_get(metrics)
                # Throughput is unknown (None) on a log step that only covers the compiling first step.
                elapsed = time.perf_counter() - timer
                tps = timed_steps * tokens_per_step / elapsed if timed_steps else None
                tflops = timed_steps * flops_per_step / elapsed / jax.device_count() / 1e12 if timed_steps else None
                last = {
                    "step": step,
                    "loss": float(metrics["loss"]),
                    "lr": float(lr(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tps,
                    "tflops_per_device": tflops,
                    "mfu": tflops / peak if tflops is not None else None,
                    "mfu_maxtext": tflops * maxtext_ratio / peak if tflops is not None else None,
                    **{k: float(metrics[k]) for k in LOGGED.get(t.objective, ())},
                }
                for key in ("aux_loss", "z_loss", "expert_load_max_over_mean", "dropped"):  # MoE models
                    if key in metrics:
                        last[key] = np.asarray(metrics[key], np.float64).round(6).tolist()
                run.log.write(last)
                if tps is not None:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * last['mfu']:.1f}%")
                if not sft:
                    say(f"step {step}: " + ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", *LOGGED[t.objective])))
                if grpo is not None:
                    grpo.show(step)
                timer, timed_steps = time.perf_counter(), 0
            if sft and (step % t.eval_every == 0 or step == t.steps):
                last.update(evaluate(step))
                timer, timed_steps = time.perf_counter(), 0
            if tasks is not None and (step % (t.eval_tasks_every or t.eval_every) == 0 or step == t.steps):
                last.update(evaluate_tasks(step))
                timer, timed_steps = time.perf_counter(), 0
            if preemption.reached(step) and (grpo is None or step % run.recipe.objective.iterations == 0):
                save(step, force=True)
                ckpt.wait()
                say(f"preempted: saved checkpoint {step} in {ckpt.directory}; rerun the same command to continue")
                return _Outcome(last, initial_eval, step)
            if step % run.recipe.checkpoint.every == 0 or step == t.steps:
                save(step, force=step == t.steps)
    finally:
        profiler.close()
        bar.close()  # before any error message, so that stays the last line
    return _Outcome(last, initial_eval, None)
