"""The training loop: prepare data, build the sharded model, train, evaluate, checkpoint, sample.

Every decision that can stop a run (a recipe conflict, missing data, an unwritable or damaged
checkpoint folder, non-finite values, preemption) is taken once and shared (lm.train.faults.agreed),
so every process of a multi-process run stops at the same point with the same message.
"""

import base64
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from lm.attention import resolve_attention_impl
from lm.data import TokenFile, Tokenizer, make_dataset, prepare_corpus
from lm.data.tokenizer import load_tokenizer
from lm.decode import generate
from lm.errors import UserError
from lm.model import Transformer
from lm.recipe import SAFE_TO_CHANGE, Recipe, diff_recipes
from lm.sampling import Sampling
from lm.train.checkpoint import Checkpointer, check_writable, has_checkpoints, kept_steps
from lm.train.compile_cache import use_compilation_cache
from lm.train.faults import NonFiniteGuard, Preemption, agreed
from lm.train.init import base_identity, build, resolve, source_tokenizer
from lm.train.metrics import MetricsLog, peak_tflops_per_device
from lm.train.optimizer import learning_rate
from lm.train.profile import StepProfiler
from lm.train.step import eval_step, train_step
from sharding.mesh import make_mesh
from sharding.partition import check_divisible, put_batch
from sharding.rules import logical_rules


def say(*args) -> None:
    """Print from process 0 only (every process still raises its own errors)."""
    if jax.process_index() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def check_resumable(run_dir: pathlib.Path, recipe: Recipe) -> None:
    """A run directory with checkpoints continues only a compatible recipe; safe changes are reported."""
    path = run_dir / "recipe.json"
    if not path.exists() or not has_checkpoints(checkpoint_dir(recipe, run_dir)):
        return  # nothing saved yet: this is a fresh start, whatever an earlier failed attempt wrote
    saved = Recipe.from_dict(json.loads(path.read_text()))
    safe, conflicts = diff_recipes(saved, recipe)
    if conflicts:
        raise UserError(
            f"{run_dir} holds a run with a different recipe ({'; '.join(conflicts)}); "
            "use a new --run-dir or the saved values"
        )
    if safe:
        say(f"resuming with changed settings: {'; '.join(safe)}")


def checkpoint_dir(recipe: Recipe, run_dir: pathlib.Path):
    return recipe.checkpoint.dir or run_dir / "checkpoints"


def write_run_files(run_dir: pathlib.Path, recipe: Recipe, tokenizer: Tokenizer) -> None:
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "recipe.json.tmp"
        tmp.write_text(json.dumps(recipe.to_dict(), indent=2))
        os.replace(tmp, run_dir / "recipe.json")  # a kill mid-write never leaves a truncated recipe
        if tokenizer.kind != "sentencepiece":  # a Hugging Face tokenizer (fine-tuning an imported model)
            tokenizer.save_pretrained(run_dir)
        elif tokenizer.path.resolve() != (run_dir / "tokenizer.model").resolve():
            shutil.copyfile(tokenizer.path, run_dir / "tokenizer.model")


def prepare_data(recipe: Recipe, run_dir: pathlib.Path) -> tuple[pathlib.Path, Tokenizer]:
    data_dir = pathlib.Path(recipe.data.dir) if recipe.data.dir else run_dir / "data"
    kwargs = dict(
        tokenizer_path=recipe.data.tokenizer or source_tokenizer(recipe),
        vocab_size=recipe.model.vocab_size,
        text_field=recipe.data.text_field,
        eval_fraction=recipe.data.eval_fraction,
        format=recipe.data.format,
        seq_len=recipe.train.seq_len,
    )
    inputs = list(recipe.data.inputs) or None
    # A prepared folder named by data.dir (e.g. from launch.prepare) is used as it is; the run's own
    # data/ folder is (re)prepared whenever its inputs or settings change.
    agreed(_check_prepared, recipe, data_dir)
    if not (recipe.data.dir and (data_dir / "meta.json").exists()):
        # Process 0 prepares (its errors, e.g. missing inputs, stop every process); the others then
        # find the finished files and reuse them, or prepare their own copy on a local disk.
        agreed(prepare_corpus, inputs, data_dir, only_first=True, **kwargs)
        if jax.process_count() > 1:
            agreed(prepare_corpus, inputs, data_dir, **kwargs)
    tokenizer = agreed(_check_vocab, recipe, data_dir)
    return data_dir, tokenizer


def _check_prepared(recipe: Recipe, data_dir: pathlib.Path) -> None:
    if recipe.data.dir and not recipe.data.inputs and not (data_dir / "meta.json").exists():
        raise UserError(
            f"data.dir={recipe.data.dir} holds no prepared data (no meta.json); run launch.prepare --out "
            f"{recipe.data.dir} first, or set data.inputs to prepare it here"
        )


def _check_vocab(recipe: Recipe, data_dir: pathlib.Path) -> Tokenizer:
    # Instruction/chat data keeps the model's own tokenizer files in tokenizer/ (lm.data.prepare).
    hf_files = data_dir / "tokenizer"
    tokenizer = load_tokenizer(hf_files if hf_files.is_dir() else data_dir / "tokenizer.model")
    for what, vocab in [(f"tokenizer {tokenizer.path}", tokenizer.vocab_size)] + [
        (f"token file {data_dir / split}", TokenFile(data_dir / split).vocab_size) for split in ("train", "eval")
    ]:
        if vocab > recipe.model.vocab_size:
            raise UserError(
                f"{what} has a vocabulary of {vocab} but model.vocab_size={recipe.model.vocab_size}; "
                f"set model.vocab_size >= {vocab} or prepare the data with a smaller tokenizer"
            )
    return tokenizer


def resolve_batch_size(recipe: Recipe, mesh) -> Recipe:
    """train.per_device_batch_size > 0 sets the global batch from the batch-parallel devices."""
    t = recipe.train
    if t.per_device_batch_size <= 0:
        return recipe
    batch = t.per_device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
    return dataclasses.replace(recipe, train=dataclasses.replace(t, batch_size=batch))


def say_memory(recipe: Recipe) -> None:
    """The planner's per-device memory estimate (lm.plan), before anything is loaded: a fine-tune on
    one GPU should learn that it does not fit before its base has been read."""
    from lm.plan import estimate

    p = estimate(recipe, devices=jax.device_count())
    m = p.memory

    def size(n: float) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    by_remat = ", ".join(f"{k} {size(v)}" for k, v in m.activations_by_remat.items())
    base = recipe.lora.base_dtype if recipe.lora.rank else recipe.model.param_dtype
    say(
        f"memory estimate per device ({p.hardware}): parameters {size(m.params)} (base in {base}), optimizer "
        f"{size(m.optimizer)}, gradients {size(m.gradients)}, activations + logits "
        f"{size(m.activations + max(m.working, m.logits))} (remat={recipe.model.remat}; by policy: {by_remat}); "
        f"total {size(m.total)} of {size(p.capacity_bytes)}" + ("" if p.fits else " -> DOES NOT FIT; see launch.plan")
    )


def split_rows(local: dict, k: int) -> list[dict]:
    """A process's rows as k microbatches, microbatch i taking rows i, i+k, ... (as train_step does)."""
    return [local] if k == 1 else [{name: v[i::k] for name, v in local.items()} for i in range(k)]


def eval_loss(model, batches, mesh, rules, microbatches: int = 1) -> float:
    """Mean token loss over the eval batches, run in the training step's microbatches: evaluating a
    whole global batch at once would need the memory that train.grad_accum exists to avoid."""
    total, weight = 0.0, 0.0
    for local in batches:
        for part in split_rows(local, microbatches):
            s, w = eval_step(model, put_batch(part, mesh, rules))
            total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)


@dataclasses.dataclass
class Run:
    """What the step loop works on, gathered once by train()."""

    recipe: Recipe
    mesh: jax.sharding.Mesh
    rules: Any
    model: Transformer
    optimizer: nnx.Optimizer
    train_iter: Any  # grain iterator over process-local batches; its state is checkpointed
    eval_batches: list[dict]
    ckpt: Checkpointer
    log: MetricsLog
    meta: dict  # saved with every checkpoint: recipe, seed, tokenizer
    start: int  # the restored step (0: a fresh run)


@dataclasses.dataclass
class Outcome:
    last: dict  # the last logged metrics
    initial_eval: float | None  # the untrained model's eval loss (fresh runs only)
    preempted: int | None  # the step saved on preemption


def train(recipe: Recipe, run_dir: str | pathlib.Path) -> dict:
    """Train (or resume) the run in run_dir. Returns a summary of the last metrics and the sample."""
    run_dir = pathlib.Path(run_dir)
    if recipe.init.required and not recipe.init.from_:
        raise UserError(
            f"recipe {recipe.name} fine-tunes a pretrained model: pass --set init.from=DIR (a Hugging Face folder "
            "from `huggingface-cli download`, a run directory or a checkpoint step)"
        )
    mesh, rules = make_mesh(recipe.mesh), logical_rules(recipe.mesh.rules)
    recipe = resolve_batch_size(resolve(recipe), mesh)  # resolve: the model section of init.from
    t, m = recipe.train, recipe.model
    agreed(check_resumable, run_dir, recipe)
    check_divisible(recipe.logical_dims(), mesh, rules)
    agreed(check_writable, checkpoint_dir(recipe, run_dir))
    say("attention: %s (%s)" % resolve_attention_impl(m, jax.default_backend(), t.seq_len))
    if recipe.init.from_ or recipe.lora.rank:
        say_memory(recipe)
    data_dir, tokenizer = prepare_data(recipe, run_dir)
    use_compilation_cache(t.compilation_cache, run_dir)  # after every input check: bad input writes nothing

    pid, nproc = jax.process_index(), jax.process_count()
    train_iter = iter(make_dataset(TokenFile(data_dir / "train"), t.seq_len, t.batch_size, t.seed, pid, nproc))
    eval_ds = make_dataset(
        TokenFile(data_dir / "eval"), t.seq_len, t.batch_size, t.seed, pid, nproc, shuffle=False, num_epochs=1
    )
    eval_batches = [b for _, b in zip(range(t.eval_batches), eval_ds)]
    tokenizer_sha = tokenizer.sha256

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):

        model, optimizer = build(recipe, mesh, rules)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, optimizer.wrt)))
        base = base_identity(recipe) if recipe.lora.rank else None
        say(
            f"model: {n_params / 1e6:.2f}M {'adapter ' if recipe.lora.rank else ''}parameters; mesh "
            f"{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices; {nproc} process(es)"
        )
        if recipe.lora.rank:
            saved = sum(x.nbytes for x in jax.tree.leaves((nnx.state(model, nnx.LoRAParam), nnx.state(optimizer))))
            say(
                f"LoRA rank {recipe.lora.rank} on a {recipe.lora.base_dtype} base from "
                f"{recipe.init.from_ or 'random init'}; a checkpoint holds the adapter and its optimizer state ({saved / 2**20:.1f} MiB), not the base"
            )

        def same_run(step: int, meta: dict) -> None:
            saved = meta.get("recipe", {}).get("model", {})
            changed = [
                f"model.{k}: {saved[k]!r} -> {v!r}"
                for k, v in dataclasses.asdict(m).items()
                if k in saved and saved[k] != v and not f"model.{k}".startswith(SAFE_TO_CHANGE)
            ]
            if changed:
                raise UserError(
                    f"checkpoint {step} in {ckpt.directory} belongs to another model ({'; '.join(changed)}); "
                    "use a new --run-dir"
                )
            if base and meta.get("base") and meta["base"]["fingerprint"] != base["fingerprint"]:
                raise UserError(
                    f"checkpoint {step} holds a LoRA adapter for the base {meta['base']['weights']}, but the files of "
                    f"init.from={recipe.init.from_} have changed since; restore that base or use a new --run-dir"
                )
            if meta.get("tokenizer_sha256") not in (None, tokenizer_sha):
                raise UserError(
                    f"checkpoint {step} was trained with a different tokenizer than {tokenizer.path}; "
                    "use the run's own data (data.dir) or a new --run-dir"
                )

        ckpt = Checkpointer(checkpoint_dir(recipe, run_dir), recipe.checkpoint)
        start = ckpt.restore_latest(model, optimizer, train_iter, check_meta=same_run)
        if start:
            say(f"resumed from {ckpt.directory} at step {start}")
        write_run_files(run_dir, recipe, tokenizer)
        meta = {
            "recipe": recipe.to_dict(),
            "seed": t.seed,
            "tokenizer_sha256": tokenizer_sha,
        }
        if tokenizer.kind == "sentencepiece":
            meta["tokenizer_model"] = base64.b64encode(tokenizer.path.read_bytes()).decode()
        if base:
            meta["base"] = base
        log = MetricsLog(
            run_dir, recipe.to_dict(), wandb_mode=recipe.logging.wandb, project=recipe.logging.project, enabled=pid == 0
        )
        # One row per step, even after a crash between checkpoints; rows of a step that still exists
        # in any form (a damaged one set aside included) are never cut.
        log.truncate_after(max([start, *kept_steps(ckpt.directory)]))
        if start >= t.steps:
            say(
                f"the checkpoint is at step {start} and train.steps={t.steps}: nothing to train; raise train.steps "
                "to continue (the cosine schedule then stretches to the new total)"
            )
        run = Run(recipe, mesh, rules, model, optimizer, train_iter, eval_batches, ckpt, log, meta, start)
        preemption, guard = Preemption(), NonFiniteGuard(t.max_bad_steps)
        try:
            outcome = _loop(run, preemption, guard)
            ckpt.wait()  # the last save reaches the disk (or its error is raised) before we report
        finally:
            preemption.close()
            ckpt.close()  # waits for a save in flight: a failure elsewhere never costs a checkpoint
        if guard.skipped:
            say(f"skipped {len(guard.skipped)} non-finite step(s): {guard.skipped}")

        sample = ""
        prompt = tokenizer.encode(t.sample_prompt)
        n = min(t.sample_tokens, m.max_seq_len - len(prompt))  # a prompt near the context length gets fewer
        if outcome.preempted is None and prompt and n > 0:
            out = generate(
                model,
                [prompt],
                max_new_tokens=n,
                sampling=Sampling(temperature=0.7, top_k=40),
                seed=t.seed,
                eos_id=tokenizer.eos_id,
            )
            sample = t.sample_prompt + tokenizer.decode([i for i in out.tokens[0] if i != tokenizer.eos_id])
        log.close()
    return {
        **outcome.last,
        "initial_eval_loss": outcome.initial_eval,
        "sample": sample,
        "start_step": start,
        "params": int(n_params),
        "preempted": outcome.preempted,
        "process": jax.process_index(),
    }


def _loop(run: Run, preemption: Preemption, guard: NonFiniteGuard) -> Outcome:
    """The step loop: train, log, evaluate, checkpoint; stop cleanly on preemption."""
    t, m, ckpt = run.recipe.train, run.recipe.model, run.ckpt
    lr = learning_rate(run.recipe.optimizer, t.steps)
    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = m.flops_per_token(t.seq_len) * tokens_per_step
    maxtext_ratio = m.flops_per_token(t.seq_len, "maxtext") / m.flops_per_token(t.seq_len)
    peak, peak_source = peak_tflops_per_device(t.peak_tflops)
    say(f"MFU: 6N + 12*L*T*H*D FLOPs per token (PaLM), peak {peak:.2f} TFLOP/s per device from {peak_source}")
    profiler = StepProfiler(t.profile_range, run.log.path.parent / "profile", settle=ckpt.wait)

    def evaluate(step: int) -> dict:
        el = eval_loss(run.model, run.eval_batches, run.mesh, run.rules, t.grad_accum)
        row = {"step": step, "eval_loss": el, "eval_ppl": math.exp(min(el, 50.0))}
        run.log.write(row)
        say(f"step {step}: eval loss {el:.3f}, perplexity {row['eval_ppl']:.1f}")
        return row

    def save(step: int, force: bool = False) -> None:
        guard.check(ckpt.latest_step(), str(ckpt.directory))  # never checkpoint a non-finite state
        ckpt.save(step, run.model, run.optimizer, run.train_iter, run.meta, force=force)

    # The untrained model's eval loss: the starting point that later evals are measured against.
    initial_eval = evaluate(0)["eval_loss"] if run.start == 0 else None
    last = {}
    bar = tqdm(total=t.steps, initial=run.start, disable=jax.process_index() != 0, dynamic_ncols=True, desc="train")
    try:
        timer, timed_steps = time.perf_counter(), 0
        for step in range(run.start + 1, t.steps + 1):
            batch = put_batch(next(run.train_iter), run.mesh, run.rules)
            profiler.before(step)
            metrics = train_step(run.model, run.optimizer, batch, grad_accum=t.grad_accum)
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
                }
                run.log.write(last)
                if tps is not None:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * last['mfu']:.1f}%")
                timer, timed_steps = time.perf_counter(), 0
            if step % t.eval_every == 0 or step == t.steps:
                last.update(evaluate(step))
                timer, timed_steps = time.perf_counter(), 0
            if preemption.reached(step):
                save(step, force=True)
                ckpt.wait()
                say(f"preempted: saved checkpoint {step} in {ckpt.directory}; rerun the same command to continue")
                return Outcome(last, initial_eval, step)
            if step % run.recipe.checkpoint.every == 0 or step == t.steps:
                save(step, force=step == t.steps)
    finally:
        profiler.close()
        bar.close()  # before any error message, so that stays the last line
    return Outcome(last, initial_eval, None)
