"""The training loop: prepare data, build the sharded model, train, evaluate, checkpoint, sample."""

import dataclasses
import json
import math
import pathlib
import shutil
import time

import jax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from lm.data import TokenFile, Tokenizer, make_dataset, prepare_corpus
from lm.decode import generate
from lm.errors import UserError
from lm.model import Transformer
from lm.recipe import Recipe, diff_recipes
from lm.sampling import Sampling
from lm.train.checkpoint import Checkpointer
from lm.train.metrics import MetricsLog, peak_tflops_per_device
from lm.train.optimizer import learning_rate, make_optimizer
from lm.train.step import eval_step, train_step
from sharding.mesh import make_mesh
from sharding.partition import check_divisible, create_sharded, put_batch
from sharding.rules import logical_rules


def say(*args) -> None:
    """Print from process 0 only (every process still raises its own errors)."""
    if jax.process_index() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def reconcile_recipe(run_dir: pathlib.Path, recipe: Recipe) -> None:
    """On resume, refuse changes that would not continue the same run; report the safe ones."""
    path = run_dir / "recipe.json"
    if path.exists():
        saved = Recipe.from_dict(json.loads(path.read_text()))
        safe, conflicts = diff_recipes(saved, recipe)
        if conflicts:
            raise UserError(
                f"{run_dir} holds a run with a different recipe ({'; '.join(conflicts)}); "
                "use a new --run-dir or the saved values"
            )
        if safe:
            say(f"resuming with changed settings: {'; '.join(safe)}")
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recipe.to_dict(), indent=2))


def prepare_data(recipe: Recipe, run_dir: pathlib.Path) -> tuple[pathlib.Path, Tokenizer]:
    data_dir = pathlib.Path(recipe.data.dir) if recipe.data.dir else run_dir / "data"
    kwargs = dict(
        tokenizer_path=recipe.data.tokenizer,
        vocab_size=recipe.model.vocab_size,
        text_field=recipe.data.text_field,
        eval_fraction=recipe.data.eval_fraction,
    )
    inputs = list(recipe.data.inputs) or None
    # Process 0 prepares; the others then find the finished files and reuse them.
    if jax.process_index() == 0:
        prepare_corpus(inputs, data_dir, **kwargs)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare_data")
        prepare_corpus(inputs, data_dir, **kwargs)
    tokenizer = Tokenizer(data_dir / "tokenizer.model")
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{recipe.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    if jax.process_index() == 0 and not (run_dir / "tokenizer.model").exists():
        shutil.copyfile(tokenizer.path, run_dir / "tokenizer.model")
    return data_dir, tokenizer


def resolve_batch_size(recipe: Recipe, mesh) -> Recipe:
    """train.per_device_batch_size > 0 sets the global batch from the batch-parallel devices."""
    t = recipe.train
    if t.per_device_batch_size <= 0:
        return recipe
    batch = t.per_device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
    return dataclasses.replace(recipe, train=dataclasses.replace(t, batch_size=batch))


def eval_loss(model, batches, mesh, rules) -> float:
    total, weight = 0.0, 0.0
    for local in batches:
        s, w = eval_step(model, put_batch(local, mesh, rules))
        total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)


def train(recipe: Recipe, run_dir: str | pathlib.Path) -> dict:
    """Train (or resume) the run in run_dir. Returns a summary of the last metrics and the sample."""
    run_dir = pathlib.Path(run_dir)
    mesh, rules = make_mesh(recipe.mesh), logical_rules(recipe.mesh.rules)
    recipe = resolve_batch_size(recipe, mesh)
    t, m = recipe.train, recipe.model
    reconcile_recipe(run_dir, recipe)
    data_dir, tokenizer = prepare_data(recipe, run_dir)

    dims = m.logical_dims()
    dims["batch"] = (t.batch_size // t.grad_accum, "train.batch_size/train.grad_accum")
    check_divisible({k: v[0] for k, v in dims.items()}, mesh, rules, {k: v[1] for k, v in dims.items()})

    pid, nproc = jax.process_index(), jax.process_count()
    train_iter = iter(make_dataset(TokenFile(data_dir / "train"), t.seq_len, t.batch_size, t.seed, pid, nproc))
    eval_ds = make_dataset(
        TokenFile(data_dir / "eval"), t.seq_len, t.batch_size, t.seed, pid, nproc, shuffle=False, num_epochs=1
    )
    eval_batches = [b for _, b in zip(range(t.eval_batches), eval_ds)]

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):

        def make():
            model = Transformer(m, rngs=nnx.Rngs(params=t.seed))
            return model, make_optimizer(model, recipe.optimizer, t.steps)

        model, optimizer = create_sharded(make, mesh, rules)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        say(
            f"model: {n_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)} over {jax.device_count()} "
            f"{jax.devices()[0].platform} devices; {nproc} process(es)"
        )

        ckpt = Checkpointer(run_dir / "checkpoints", recipe.checkpoint)
        start = ckpt.latest_step() or 0
        if start:
            ckpt.restore(start, model, optimizer, train_iter)
            say(f"resumed from {run_dir / 'checkpoints'} at step {start}")
        log = MetricsLog(
            run_dir, recipe.to_dict(), wandb_mode=recipe.logging.wandb, project=recipe.logging.project, enabled=pid == 0
        )

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

        # The untrained model's eval loss: the starting point that later evals are measured against.
        initial_eval = evaluate(0)["eval_loss"] if start == 0 else None
        last = {}
        bar = tqdm(total=t.steps, initial=start, disable=pid != 0, dynamic_ncols=True, desc="train")
        timer, timed_steps = time.perf_counter(), 0
        for step in range(start + 1, t.steps + 1):
            metrics = train_step(model, optimizer, put_batch(next(train_iter), mesh, rules), grad_accum=t.grad_accum)
            timed_steps += 1
            if step == start + 1:  # the first step compiles; time from the end of it
                jax.block_until_ready(metrics)
                timer, timed_steps = time.perf_counter(), 0
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                metrics = jax.device_get(metrics)
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise UserError(
                        f"loss is {loss} at step {step}; lower optimizer.lr or check the data "
                        f"(the last good checkpoint is step {ckpt.latest_step()})"
                    )
                elapsed = time.perf_counter() - timer
                tps = timed_steps * tokens_per_step / elapsed if timed_steps else float("nan")
                tflops = (
                    timed_steps * flops_per_step / elapsed / jax.device_count() / 1e12 if timed_steps else float("nan")
                )
                last = {
                    "step": step,
                    "loss": loss,
                    "lr": float(lr(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tps,
                    "tflops_per_device": tflops,
                    "mfu": tflops / peak,
                }
                log.write(last)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * last['mfu']:.1f}%")
                timer, timed_steps = time.perf_counter(), 0
            if step % t.eval_every == 0 or step == t.steps:
                last.update(evaluate(step))
                timer, timed_steps = time.perf_counter(), 0
            if step % recipe.checkpoint.every == 0 or step == t.steps:
                ckpt.save(step, model, optimizer, train_iter, {"recipe": recipe.to_dict()}, force=step == t.steps)
        bar.close()
        ckpt.wait()
        ckpt.close()

        sample = ""
        if t.sample_tokens > 0 and t.sample_prompt:
            prompt = tokenizer.encode(t.sample_prompt)
            n = min(t.sample_tokens, m.max_seq_len - len(prompt))
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
    return {**last, "initial_eval_loss": initial_eval, "sample": sample, "start_step": start, "params": int(n_params)}
