"""The training loop: prepare data, build the sharded model, train, evaluate, checkpoint, sample."""

import base64
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time

import jax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from lm.data import TokenFile, Tokenizer, make_dataset, prepare_corpus
from lm.data.tokenizer import load_tokenizer
from lm.decode import generate
from lm.errors import UserError
from lm.recipe import SAFE_TO_CHANGE, Recipe, diff_recipes
from lm.sampling import Sampling
from lm.train.checkpoint import Checkpointer, has_checkpoints
from lm.train.faults import NonFiniteGuard, Preemption
from lm.train.init import base_identity, build, resolve, source_tokenizer
from lm.train.metrics import MetricsLog, peak_tflops_per_device
from lm.train.optimizer import learning_rate
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
    if recipe.data.dir and not recipe.data.inputs and not (data_dir / "meta.json").exists():
        raise UserError(
            f"data.dir={recipe.data.dir} holds no prepared data (no meta.json); run launch.prepare --out "
            f"{recipe.data.dir} first, or set data.inputs to prepare it here"
        )
    if not (recipe.data.dir and (data_dir / "meta.json").exists()):
        # Process 0 prepares; the others then find the finished files and reuse them.
        if jax.process_index() == 0:
            prepare_corpus(inputs, data_dir, **kwargs)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("prepare_data")
            prepare_corpus(inputs, data_dir, **kwargs)
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
    return data_dir, tokenizer


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


def eval_loss(model, batches, mesh, rules) -> float:
    total, weight = 0.0, 0.0
    for local in batches:
        s, w = eval_step(model, put_batch(local, mesh, rules))
        total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)


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
    check_resumable(run_dir, recipe)
    check_divisible(recipe.logical_dims(), mesh, rules)
    if recipe.init.from_ or recipe.lora.rank:
        say_memory(recipe)
    data_dir, tokenizer = prepare_data(recipe, run_dir)

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
        log.truncate_after(start)  # one row per step, even after a crash between checkpoints
        if start >= t.steps:
            say(
                f"the checkpoint is at step {start} and train.steps={t.steps}: nothing to train; raise train.steps "
                "to continue (the cosine schedule then stretches to the new total)"
            )
        preemption, guard = Preemption(), NonFiniteGuard(t.max_bad_steps)
        try:
            last, initial_eval, preempted = _loop(
                recipe,
                model,
                optimizer,
                train_iter,
                eval_batches,
                mesh,
                rules,
                ckpt,
                log,
                meta,
                start,
                preemption,
                guard,
            )
        finally:
            preemption.close()
            ckpt.wait()
            ckpt.close()
        if guard.skipped:
            say(f"skipped {len(guard.skipped)} non-finite step(s): {guard.skipped}")

        sample = ""
        prompt = tokenizer.encode(t.sample_prompt)
        n = min(t.sample_tokens, m.max_seq_len - len(prompt))  # a prompt near the context length gets fewer
        if preempted is None and prompt and n > 0:
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
        **last,
        "initial_eval_loss": initial_eval,
        "sample": sample,
        "start_step": start,
        "params": int(n_params),
        "preempted": preempted,
        "process": jax.process_index(),
    }


def _loop(recipe, model, optimizer, train_iter, eval_batches, mesh, rules, ckpt, log, meta, start, preemption, guard):
    """The step loop. Returns (last logged metrics, untrained eval loss or None, preempted step or None)."""
    t, m = recipe.train, recipe.model
    lr = learning_rate(recipe.optimizer, t.steps)
    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = m.flops_per_token(t.seq_len) * tokens_per_step
    peak, peak_source = peak_tflops_per_device(t.peak_tflops)
    say(f"MFU: 6N + 12*L*T*H*D FLOPs per token (PaLM), peak {peak:.2f} TFLOP/s per device from {peak_source}")

    def evaluate(step: int) -> dict:
        el = eval_loss(model, eval_batches, mesh, rules)
        row = {"step": step, "eval_loss": el, "eval_ppl": math.exp(min(el, 50.0))}
        log.write(row)
        say(f"step {step}: eval loss {el:.3f}, perplexity {row['eval_ppl']:.1f}")
        return row

    def save(step: int, force: bool = False) -> None:
        guard.check(ckpt.latest_step(), str(ckpt.directory))  # never checkpoint a non-finite state
        ckpt.save(step, model, optimizer, train_iter, meta, force=force)

    # The untrained model's eval loss: the starting point that later evals are measured against.
    initial_eval = evaluate(0)["eval_loss"] if start == 0 else None
    last = {}
    bar = tqdm(total=t.steps, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True, desc="train")
    try:
        timer, timed_steps = time.perf_counter(), 0
        for step in range(start + 1, t.steps + 1):
            metrics = train_step(model, optimizer, put_batch(next(train_iter), mesh, rules), grad_accum=t.grad_accum)
            guard.add(step, metrics)
            timed_steps += 1
            if step == start + 1:  # the first step compiles; time from the end of it
                jax.block_until_ready(metrics)
                timer, timed_steps = time.perf_counter(), 0
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
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
                }
                log.write(last)
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
                return last, initial_eval, step
            if step % recipe.checkpoint.every == 0 or step == t.steps:
                save(step, force=step == t.steps)
    finally:
        bar.close()  # before any error message, so that stays the last line
    return last, initial_eval, None
