"""train.objective=dpo|grpo in the step loop: the refusals taken before anything is written, the
records read into a checkpointed stream, and one optimizer step per call (lm.train.loop drives it
as it drives SFT's train_step)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import Recipe
from lm.data.preference import RecordStream, load_rewards, pair_batch, read_pairs, read_prompts
from lm.data.tokenizer import Tokenizer, load_tokenizer
from lm.errors import UserError
from lm.state.build import base_model
from lm.state.source import InitSource, find_source
from lm.train.objectives import rollout
from lm.train.step import dpo_train_step, grpo_train_step
from sharding.mesh import Layout
from sharding.partition import check_divisible, put_batch

# What each objective logs per log step beyond loss, lr and grad_norm.
LOGGED = {
    "dpo": ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"),
    "grpo": ("reward_mean", "reward_std", "kl", "completion_length", "clip_fraction"),
}


def check_objective(recipe: Recipe, source_tokenizer: str | None) -> None:
    """Refuse, in one line each, what dpo/grpo cannot do yet, before the run writes anything."""
    t, o, kind = recipe.train, recipe.objective, recipe.train.objective
    if jax.process_count() > 1:
        # Each process would hold a slice of the pairs (chosen rows, then rejected) and of the rollout's
        # prompts, but the pair layout and the decode loop's prompts are whole-batch, one-host lists.
        raise UserError(f"train.objective={kind} runs on one process for now; launch it without --processes")
    if not recipe.data.inputs:
        what = "preference JSONL (prompt, chosen, rejected)" if kind == "dpo" else "prompt JSONL (prompt or messages)"
        raise UserError(f"train.objective={kind} reads data.inputs: set it to {what}")
    if not (recipe.data.tokenizer or source_tokenizer):
        raise UserError(
            f"train.objective={kind} needs a tokenizer: set init.from (a run or HF folder) or data.tokenizer"
        )
    if kind == "grpo":
        if t.batch_size % o.group_size:
            raise UserError(
                f"train.batch_size={t.batch_size} (completions per generation batch) must be a multiple of "
                f"objective.group_size={o.group_size}"
            )
        for key, value in (("checkpoint.every", recipe.checkpoint.every), ("train.steps", t.steps)):
            if value % o.iterations:
                raise UserError(
                    f"{key}={value} must be a multiple of objective.iterations={o.iterations}: a checkpoint "
                    "falls between generation batches"
                )
        load_rewards(o.rewards, o.reward_weights, base=os.getcwd())  # import errors stop the run now


def objective_data(recipe: Recipe, source_tokenizer: str | None, index: int, count: int):
    """(tokenizer, stream): DPO pair batches or GRPO prompt lists, train.batch_size pairs or completions."""
    t = recipe.train
    tokenizer: Tokenizer = load_tokenizer(recipe.data.tokenizer or source_tokenizer)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.path} has a vocabulary of {tokenizer.vocab_size} but model.vocab_size="
            f"{recipe.model.vocab_size}; use the model's own tokenizer"
        )
    files = [os.path.expanduser(f) for f in recipe.data.inputs]
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"data.inputs: {f} does not exist; give the JSONL file's path")
    pad = tokenizer.pad_id or 0
    if t.objective == "dpo":
        records = read_pairs(files, tokenizer)
        return tokenizer, RecordStream(
            records, t.batch_size, t.seed, lambda p: pair_batch(p, t.seq_len, pad), index, count
        )
    records = read_prompts(files, tokenizer)
    longest = max(len(p.ids) for p in records)
    if longest + recipe.objective.max_new_tokens > t.seq_len:
        raise UserError(
            f"a prompt of {longest} tokens plus objective.max_new_tokens={recipe.objective.max_new_tokens} exceeds "
            f"train.seq_len={t.seq_len}; raise train.seq_len or shorten the prompts"
        )
    return tokenizer, RecordStream(records, t.batch_size // recipe.objective.group_size, t.seed, list, index, count)


def check_reference(recipe: Recipe, tokenizer: Tokenizer) -> InitSource | None:
    """objective.reference as a folder, read once: its vocabulary must be the policy's (DPO and GRPO
    compare log-probs token by token). None for base."""
    o = recipe.objective
    if o.reference == "base":
        return None
    source = find_source(o.reference, "objective.reference")
    where = f"objective.reference={o.reference}"
    if source.model.vocab_size != recipe.model.vocab_size:
        raise UserError(
            f"{where} has a vocabulary of {source.model.vocab_size} but the policy's model.vocab_size="
            f"{recipe.model.vocab_size}; the reference must share the policy's tokenizer"
        )
    if source.tokenizer:
        theirs = load_tokenizer(source.tokenizer)
        if theirs.sha256 != tokenizer.sha256 and not same_vocabulary(theirs, tokenizer):
            raise UserError(
                f"{where} has another tokenizer ({theirs.path}) than the policy ({tokenizer.path}); the reference "
                "must share the policy's tokenizer"
            )
    return source


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Every id is the same piece (two folders may hold the same vocabulary in different files)."""
    return a.vocab_size == b.vocab_size and all(a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size))


def reference_model(recipe: Recipe, layout: Layout, model: nnx.Module, source: InitSource | None):
    """DPO/GRPO's frozen reference, sharded like the policy; None where it is the LoRA base (the policy
    with its adapters off: no second copy). `source`: check_reference's. Call under the layout before a
    checkpoint is restored: a full fine-tune's reference=base is a copy of the initial weights."""
    if source is None:
        if recipe.lora.rank:
            return None
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))  # own buffers: steps donate the policy's
    cfg = source.model.with_execution_of(recipe.model)
    check_divisible(cfg.logical_dims(), layout)
    plain = dataclasses.replace(recipe, model=cfg, lora=dataclasses.replace(recipe.lora, rank=0))
    return base_model(plain, layout, source)


def dpo_stepper(run):
    o, accum = run.recipe.objective, run.recipe.train.grad_accum

    def step(_: int) -> dict:
        batch = put_batch(next(run.train_iter), run.layout)
        return dpo_train_step(
            run.model, run.optimizer, batch, run.reference, beta=o.beta, loss_type=o.loss_for("dpo"), grad_accum=accum
        )

    return step


def generation_seed(seed: int, step: int) -> int:
    """The sampling seed of the generation batch that starts at `step`: from (train.seed, step) alone,
    so a resumed run samples what the uninterrupted one did."""
    return int(np.random.SeedSequence((seed, step)).generate_state(1)[0] & 0x7FFFFFFF)


class GrpoStepper:
    """Every objective.iterations steps, a new generation batch (rollout on the live policy); each step,
    one grpo_train_step pass over it."""

    def __init__(self, run, say):
        self.run, self.say, self.current = run, say, None
        o = run.recipe.objective
        self.rewards = load_rewards(o.rewards, o.reward_weights, base=os.getcwd())

    def __call__(self, step: int) -> dict:
        run, o, t = self.run, self.run.recipe.objective, self.run.recipe.train
        if (step - 1) % o.iterations == 0 or self.current is None:
            prompts = next(run.train_iter)
            self.current = r = rollout(
                run.model, run.tokenizer, prompts, self.rewards, group_size=o.group_size,
                max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                seed=generation_seed(t.seed, step), seq_len=t.seq_len, beta=o.beta, reference=run.reference,
            )  # fmt: skip
            self.batch = put_batch({k: np.asarray(v) for k, v in r.batch.items()}, run.layout)
            self.advantages = jnp.asarray(r.advantages)
            self.fresh = True
        r = self.current
        metrics = grpo_train_step(
            run.model, run.optimizer, self.batch, r.old_logps, r.ref_logps, self.advantages, beta=o.beta,
            epsilon=o.epsilon, temperature=o.temperature, loss_type=o.loss_for("grpo"), grad_accum=t.grad_accum,
        )  # fmt: skip
        return {**metrics, **r.metrics(), **({} if o.beta else {"kl": 0.0})}

    def show(self, step: int, n: int = 2) -> None:
        """A few of the newest generation batch's completions, with their rewards."""
        if self.current is None or not self.fresh:
            return
        self.fresh = False
        r = self.current
        for i in range(min(n, len(r.completions))):
            prompt = r.prompts[i].prompt if isinstance(r.prompts[i].prompt, str) else r.prompts[i].prompt[-1]["content"]
            self.say(f"step {step} sample (reward {r.rewards[i]:.3g}): {prompt!r} -> {r.completions[i]!r}")
