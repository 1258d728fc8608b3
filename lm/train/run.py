"""Setting up a run: every check that can refuse it, its data, its model on the mesh, and the
checkpoint it resumes from, gathered into one Run that the loop (lm.train.loop) works on.

Every decision that can stop a run (a recipe conflict, missing data, an unwritable or damaged
checkpoint folder) is taken once and shared (lm.state.agree.agreed), so every process of a
multi-process run stops at the same point with the same message.
"""

import base64
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from lm.config import Recipe, diff_recipes
from lm.data import TokenFile, Tokenizer, make_dataset, prepare_corpus
from lm.data.tokenizer import load_tokenizer
from lm.errors import UserError
from lm.kernels import resolve_attention_impl
from lm.model import Transformer
from lm.plan import estimate
from lm.state.agree import agreed
from lm.state.build import build
from lm.state.checkpoint import (
    Checkpointer,
    CheckpointMeta,
    as_path,
    check_writable,
    finished_steps,
    has_checkpoints,
    kept_steps,
    peek_meta,
)
from lm.state.source import InitSource, resolve_init
from lm.train.compile_cache import use_compilation_cache
from lm.train.metrics import MetricsLog
from lm.train.preference_run import check_objective, check_reference, objective_data, reference_model
from sharding.mesh import Layout
from sharding.partition import check_divisible, process_rows


def say(*args) -> None:
    """Print from process 0 only (every process still raises its own errors)."""
    if jax.process_index() == 0:
        tqdm.write(" ".join(str(a) for a in args))


@dataclasses.dataclass(kw_only=True)
class Run:
    """What the step loop works on."""

    recipe: Recipe  # resolved: init.from's model section, the batch size for this mesh
    layout: Layout
    run_dir: pathlib.Path
    tokenizer: Tokenizer
    model: Transformer
    optimizer: nnx.Optimizer
    train_iter: Any  # grain iterator over process-local batches; its state is checkpointed
    eval_batches: list[dict]
    ckpt: Checkpointer
    log: MetricsLog
    meta: CheckpointMeta  # saved with every checkpoint
    start: int  # the restored step (0: a fresh run)
    n_params: int  # what trains: every parameter, or a LoRA run's adapters
    reference: Transformer | None = None  # dpo/grpo's frozen reference model (None: the LoRA base, adapters off)


def checkpoint_dir(recipe: Recipe, run_dir: pathlib.Path):
    return recipe.checkpoint.dir or run_dir / "checkpoints"


def run_id(run_dir: pathlib.Path) -> str:
    """A run's identity, kept in every checkpoint's meta: the id its first start wrote into the run
    folder (it moves with the folder), or, where the folder has none (a fresh run, or a pod worker
    whose local folder is gone), a hash of the folder's absolute path, the same on every process."""
    file = run_dir / "run_id"
    if file.is_file():
        return file.read_text().strip()
    return hashlib.sha256(str(run_dir.absolute()).encode()).hexdigest()[:16]


def check_owner(recipe: Recipe, run_dir: pathlib.Path, directory, step: int, meta: CheckpointMeta) -> list[str]:
    """Refuse a checkpoint that belongs to another run (its run id) or was trained with a recipe that
    differs beyond the safe keys (the whole recipe in its meta, not the run folder's recipe.json,
    which a pod worker may have lost). Returns the safe changes."""
    if meta.run_id not in (None, run_id(run_dir)):
        raise UserError(
            f"checkpoint.dir {directory} holds the checkpoints of another run ({meta.run_dir}); set "
            f"checkpoint.dir to a folder of this run's own, or pass --run-dir {meta.run_dir} to continue that run"
        )
    if not meta.recipe and not (run_dir / "recipe.json").exists():
        return []
    safe, conflicts = diff_recipes(meta.run_recipe(run_dir), recipe)
    model = [c for c in conflicts if c.startswith("model.")]
    if model:
        raise UserError(
            f"checkpoint {step} in {directory} belongs to another model ({'; '.join(model)}); use a new --run-dir"
        )
    if conflicts:
        raise UserError(
            f"{run_dir} holds a run with a different recipe ({'; '.join(conflicts)}); "
            "use a new --run-dir or the saved values"
        )
    return safe


def check_moved(run_dir: pathlib.Path, recipe: Recipe) -> None:
    """A run whose checkpoint.dir changes continues only from a folder that holds its steps: an
    empty one would restart it at step 0 and cut its metrics.jsonl."""
    path = run_dir / "recipe.json"
    if not path.exists():
        return
    old = as_path(checkpoint_dir(Recipe.from_dict(json.loads(path.read_text())), run_dir))
    new = as_path(checkpoint_dir(recipe, run_dir))
    if old == new or has_checkpoints(new):
        return  # a folder with steps: check_owner decides whether they are this run's
    logged = (run_dir / "metrics.jsonl").exists() and '"loss"' in (run_dir / "metrics.jsonl").read_text()
    if has_checkpoints(old) or logged:
        raise UserError(
            f"checkpoint.dir moved from {old} to {new}, which holds none of this run's checkpoints; copy "
            f"them there first (cp -r {old}/. {new}/) or set checkpoint.dir={old}"
        )


def check_resumable(run_dir: pathlib.Path, recipe: Recipe) -> None:
    """Before anything is written: a run continues only its own checkpoints, under a compatible
    recipe, from where they are; safe changes are reported."""
    check_moved(run_dir, recipe)
    directory = checkpoint_dir(recipe, run_dir)
    steps = finished_steps(directory)
    if not steps:
        return  # nothing saved yet: this is a fresh start, whatever an earlier failed attempt wrote
    meta = peek_meta(directory, steps[-1])  # each process alone: only some may see these files
    if meta is None:
        return  # a damaged newest step: restore_latest sets it aside and checks the one it restores
    safe = check_owner(recipe, run_dir, as_path(directory), steps[-1], meta)
    if safe:
        say(f"resuming with changed settings: {'; '.join(safe)}")


def write_run_files(run_dir: pathlib.Path, recipe: Recipe, tokenizer: Tokenizer) -> None:
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "recipe.json.tmp"
        tmp.write_text(json.dumps(recipe.to_dict(), indent=2))
        os.replace(tmp, run_dir / "recipe.json")  # a kill mid-write never leaves a truncated recipe
        if not (run_dir / "run_id").exists():
            (run_dir / "run_id").write_text(run_id(run_dir))
        if tokenizer.kind != "sentencepiece":  # a Hugging Face tokenizer (fine-tuning an imported model)
            tokenizer.save_pretrained(run_dir)
        elif tokenizer.path.resolve() != (run_dir / "tokenizer.model").resolve():
            shutil.copyfile(tokenizer.path, run_dir / "tokenizer.model")


def prepare_data(recipe: Recipe, run_dir: pathlib.Path, source: InitSource | None) -> tuple[pathlib.Path, Tokenizer]:
    data_dir = pathlib.Path(recipe.data.dir) if recipe.data.dir else run_dir / "data"
    kwargs = dict(
        tokenizer_path=recipe.data.tokenizer or (source.tokenizer if source else None),
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


def say_memory(recipe: Recipe) -> None:
    """The planner's per-device memory estimate (lm.plan), before anything is loaded: a fine-tune on
    one GPU should learn that it does not fit before its base has been read."""
    p = estimate(recipe, devices=jax.device_count())
    m = p.memory

    def size(n: float) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    by_remat = ", ".join(f"{k} {size(v)}" for k, v in m.activations_by_remat.items())
    base = recipe.lora.base_dtype if recipe.lora.rank else recipe.model.param_dtype
    say(
        f"memory estimate per device ({p.hardware}): parameters {size(m.params)} (base in {base}), optimizer "
        f"{size(m.optimizer)}, "
        + (f"reference model {size(m.reference)}, " if m.reference else "")
        + f"gradients {size(m.gradients)}, activations + logits "
        f"{size(m.activations + max(m.working, m.logits))} (remat={recipe.model.remat}; by policy: {by_remat}); "
        f"total {size(m.total)} of {size(p.capacity_bytes)}" + ("" if p.fits else " -> DOES NOT FIT; see launch.plan")
    )


def check_same_run(recipe: Recipe, source: InitSource | None, tokenizer: Tokenizer, directory, run_dir):
    """The refusal of a checkpoint that belongs to another run: another run id or recipe
    (check_owner), another LoRA base, or another tokenizer. Returns check(step, meta) for
    Checkpointer.restore_latest, so every step it tries is checked, not only the newest."""

    def check(step: int, meta: CheckpointMeta) -> None:
        check_owner(recipe, run_dir, directory, step, meta)
        if recipe.lora.rank and source and meta.base and meta.base["fingerprint"] != source.fingerprint:
            raise UserError(
                f"checkpoint {step} holds a LoRA adapter for the base {meta.base['weights']}, but the files of "
                f"init.from={recipe.init.from_} have changed since; restore that base or use a new --run-dir"
            )
        if meta.tokenizer_sha256 not in (None, tokenizer.sha256):
            raise UserError(
                f"checkpoint {step} was trained with a different tokenizer than {tokenizer.path}; "
                "use the run's own data (data.dir) or a new --run-dir"
            )

    return check


def setup(recipe: Recipe, run_dir: pathlib.Path, source: InitSource | None = None) -> Run:
    """Check, prepare, build and restore: everything before the first step. `source` is init.from
    already resolved (lm.state.source.resolve_init); without it, init.from is resolved here."""
    if recipe.init.required and not recipe.init.from_:
        raise UserError(
            f"recipe {recipe.name} fine-tunes a pretrained model: pass --set init.from=DIR (a Hugging Face folder "
            "from `huggingface-cli download`, a run directory or a checkpoint step)"
        )
    if recipe.init.from_ and source is None:
        recipe, source = resolve_init(recipe)
    layout = Layout.build(recipe.mesh)
    recipe = recipe.with_batch_for(layout.batch_devices)
    t = recipe.train
    agreed(check_resumable, run_dir, recipe)
    check_divisible(recipe.logical_dims(), layout)
    agreed(check_writable, checkpoint_dir(recipe, run_dir))
    impl, why = resolve_attention_impl(
        recipe.model, jax.default_backend(), t.seq_len, context_devices=layout.mesh.shape["context"]
    )
    say(f"attention: {impl} ({why})")
    if source or recipe.lora.rank:
        say_memory(recipe)
    pid, nproc = jax.process_index(), jax.process_count()
    reference_source = None
    if t.objective != "sft":  # preference or RL records, read whole (lm.train.preference_run)
        agreed(check_objective, recipe, source.tokenizer if source else None)
        tokenizer, train_iter = agreed(objective_data, recipe, source.tokenizer if source else None, pid, nproc)
        reference_source = agreed(check_reference, recipe, tokenizer)
        eval_batches = []
    else:
        data_dir, tokenizer = prepare_data(recipe, run_dir, source)
    use_compilation_cache(t.compilation_cache, run_dir)  # after every input check: bad input writes nothing

    if t.objective == "sft":
        rows = process_rows(layout, t.batch_size)  # this process's devices' rows: any mesh, any axis across processes
        train_iter = iter(make_dataset(TokenFile(data_dir / "train"), t.seq_len, t.batch_size, t.seed, rows))
        eval_ds = make_dataset(
            TokenFile(data_dir / "eval"), t.seq_len, t.batch_size, t.seed, rows, shuffle=False, num_epochs=1
        )
        eval_batches = [b for _, b in zip(range(t.eval_batches), eval_ds)]

    with layout:
        model, optimizer = build(recipe, layout, source)
        reference = None if t.objective == "sft" else reference_model(recipe, layout, model, reference_source)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, optimizer.wrt)))
        say(
            f"model: {n_params / 1e6:.2f}M {'adapter ' if recipe.lora.rank else ''}parameters; mesh "
            f"{layout.shape} over {jax.device_count()} {jax.devices()[0].platform} devices; {nproc} process(es)"
        )
        if recipe.lora.rank:
            saved = sum(x.nbytes for x in jax.tree.leaves((nnx.state(model, nnx.LoRAParam), nnx.state(optimizer))))
            say(
                f"LoRA rank {recipe.lora.rank} on a {recipe.lora.base_dtype} base from "
                f"{recipe.init.from_ or 'random init'}; a checkpoint holds the adapter and its optimizer state "
                f"({saved / 2**20:.1f} MiB), not the base"
            )
        ckpt = Checkpointer(checkpoint_dir(recipe, run_dir), recipe.checkpoint)
        start = ckpt.restore_latest(
            model, optimizer, train_iter, check_meta=check_same_run(recipe, source, tokenizer, ckpt.directory, run_dir)
        )
    if start:
        say(f"resumed from {ckpt.directory} at step {start}")
    write_run_files(run_dir, recipe, tokenizer)
    meta = CheckpointMeta(
        recipe=recipe.to_dict(),
        seed=t.seed,
        tokenizer_sha256=tokenizer.sha256,
        tokenizer_model=(
            base64.b64encode(tokenizer.path.read_bytes()).decode() if tokenizer.kind == "sentencepiece" else None
        ),
        base=source.identity() if recipe.lora.rank and source else None,
        run_id=run_id(run_dir),
        run_dir=str(run_dir.absolute()),
    )
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
    return Run(
        recipe=recipe, layout=layout, run_dir=run_dir, tokenizer=tokenizer, model=model, optimizer=optimizer,
        train_iter=train_iter, eval_batches=eval_batches, ckpt=ckpt, log=log, meta=meta, start=start,
        n_params=int(n_params), reference=reference,
    )  # fmt: skip
