"""DPO and GRPO on LoRA against TRL 1.16 itself: a tiny transformers Llama and its import into nnx-lm
carry the same adapters; TRL's DPOTrainer and GRPOTrainer compute the log-probs from the torch model
and the loss, and ours must give the same loss and the same adapter gradients. The reference is the
base with adapters off on both sides (TRL's `disable_adapter`, our `lora.adapters_off`)."""

import json
import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import lora
from lm.config import LoraConfig
from lm.data.preference import (
    completion_batch,
    encode_pair,
    encode_prompt,
    load_rewards,
    pair_batch,
    read_pairs,
    read_prompts,
)
from lm.data.tokenizer import Tokenizer
from lm.errors import UserError
from lm.hf import load_hf
from lm.hf.peft import peft_adapter
from lm.train.objectives import (
    dpo_objective,
    group_advantages,
    grpo_loss,
    reference_token_logps,
    token_logps,
)

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

SPEC = LoraConfig(rank=4, alpha=8.0, base_dtype="float32")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5, I think"}],
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "I would rather not say."}],
    },
    {
        "prompt": [{"role": "user", "content": "def add(a, b):"}],
        "chosen": [{"role": "assistant", "content": "return a + b"}],
        "rejected": [{"role": "assistant", "content": "pass"}],
    },
]

REWARDS = '''
import re


def exact_answer(prompts, completions, answer, **kwargs):
    """1 when <answer>...</answer> holds the record's answer; None when there is no answer tag."""
    out = []
    for completion, want in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[0]["content"]
        found = re.search(r"<answer>(.*?)</answer>", text)
        out.append(None if found is None else float(found.group(1).strip() == str(want)))
    return out


def short(completions, completion_ids, **kwargs):
    return [-0.1 * len(ids) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from hf_builders import bpe_folder, tiny_llama

    root = tmp_path_factory.mktemp("objectives")
    return tiny_llama(root / "model", bpe_folder(root / "tok", gpt2=False), vocab_size=400, context=64)


@pytest.fixture(scope="module")
def adapted(hf_folder):
    """Our import of the folder with LoRA adapters whose A and B are both random (B = 0 would make the
    policy equal the reference), and PEFT's tensors of those adapters. The tests leave it unchanged."""
    model = load_hf(hf_folder, dtype="float32")
    lora.apply(model, SPEC)
    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    rng = np.random.default_rng(3)
    nnx.update(
        model, jax.tree.unflatten(tree, [jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) for x in leaves])
    )
    return model, peft_adapter(model, SPEC)[0]


def load_adapters(trainer, tensors):
    """Put our adapters into TRL's PeftModel (its 'default' adapter)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(trainer.model, {k: torch.tensor(v) for k, v in tensors.items()})
    assert not [k for k in result.unexpected_keys if "lora" in k]
    trainer.model.train()


def torch_grads(trainer):
    """TRL's adapter gradients under our export's names."""
    return {
        name.replace(".default.", "."): p.grad.numpy()
        for name, p in trainer.model.named_parameters()
        if p.grad is not None and "lora_" in name
    }


def our_grads(model, grads_state):
    """Our adapter gradients in PEFT's names and layout (the export's own reshapes and transposes)."""
    copy = nnx.clone(model)
    nnx.update(copy, grads_state)
    return peft_adapter(copy, SPEC)[0]


def assert_grads_close(ours, theirs):
    assert set(ours) == set(theirs) and len(ours) == 2 * 7 * 2
    scale = max(np.abs(g).max() for g in theirs.values())
    assert scale > 1e-3  # the gradients are not trivially zero
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-5, err_msg=name)


def lora_config():
    return peft.LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=TARGETS, lora_dropout=0.0)


def grads_of(model, objectives: dict, wrt=nnx.LoRAParam) -> dict:
    """{name: (loss, aux, gradients of wrt)} of each objectives[name](model), in one compiled function."""
    graphdef, params, rest = nnx.split(model, wrt, ...)

    @jax.jit
    def run(p, frozen):
        out = {}
        for name, objective in objectives.items():
            f = lambda q, objective=objective: objective(nnx.merge(graphdef, q, frozen))  # noqa: E731
            (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(p)
            out[name] = (loss, aux, grads)
        return out

    return run(params, nnx.as_pure(rest))


@pytest.mark.slow
def test_dpo_loss_and_gradient_equal_trl_dpo_trainer(hf_folder, adapted, tmp_path):
    """TRL's DPOTrainer tokenises the pairs, computes the log-probs from the torch PeftModel (its
    reference: adapters disabled) and the loss; ours matches both loss types within 1e-5, with the
    same adapter gradients, and the same reward metrics."""
    import datasets
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    args = trl.DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=0.1,
        per_device_train_batch_size=len(PAIRS), max_length=None,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=hf, args=args, train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tok,
        peft_config=lora_config(),
    )  # fmt: skip
    model, tensors = adapted
    load_adapters(trainer, tensors)

    # Our rendering gives TRL's token ids exactly.
    ours = Tokenizer(hf_folder)
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    for record, row in zip(PAIRS, rows):
        pair = encode_pair(record, ours)
        assert (pair.prompt, pair.chosen, pair.rejected) == (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
    pairs = [encode_pair(r, ours) for r in PAIRS]
    batch = {k: jnp.asarray(v) for k, v in pair_batch(pairs, 64).items()}

    def objective(loss_type):
        def f(m):
            ref_sums = (reference_token_logps(m, batch) * batch["weights"]).sum(-1)
            return dpo_objective(m, batch, ref_sums, beta=0.1, loss_type=loss_type)

        return f

    results = grads_of(model, {t: objective(t) for t in ("sigmoid", "ipo")})
    for loss_type, (loss, metrics, grads) in results.items():
        trainer.loss_types = [loss_type]
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
        theirs.backward()
        assert abs(float(loss) - theirs.item()) < 1e-5, (loss_type, float(loss), theirs.item())
        assert_grads_close(our_grads(model, grads), torch_grads(trainer))
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        for ours_key, trl_key in [
            ("rewards_chosen", "rewards/chosen"),
            ("rewards_rejected", "rewards/rejected"),
            ("reward_margin", "rewards/margins"),
            ("reward_accuracy", "rewards/accuracies"),
        ]:
            assert abs(float(metrics[ours_key]) - logged[trl_key]) < 1e-5, (
                ours_key,
                metrics[ours_key],
                logged[trl_key],
            )
    assert abs(float(metrics["reward_margin"])) > 1e-3  # the adapters moved the policy off the reference


@pytest.mark.slow
def test_dpo_full_fine_tune_equals_trl_dpo_trainer_with_a_reference_model(hf_folder, tmp_path):
    """No LoRA: TRL's DPOTrainer with a policy moved off the weights and a separate reference model
    (the folder's weights); ours, with the folder imported as its frozen reference, gives the same loss
    and the same gradient of every weight, in Hugging Face names (lm.hf.hf_tensors)."""
    import datasets
    import transformers

    from lm.hf.convert import hf_tensors

    tok = transformers.AutoTokenizer.from_pretrained(hf_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "policy")
    ref_hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, beta=0.1,
        per_device_train_batch_size=len(PAIRS), max_length=None,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=hf, ref_model=ref_hf, args=args, train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tok
    )
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    theirs.backward()
    torch_grads = {n: p.grad.numpy() for n, p in trainer.model.named_parameters()}

    policy, reference = load_hf(tmp_path / "policy", dtype="float32"), load_hf(hf_folder, dtype="float32")
    pairs = [encode_pair(r, Tokenizer(hf_folder)) for r in PAIRS]
    batch = {k: jnp.asarray(v) for k, v in pair_batch(pairs, 64).items()}

    ref_graphdef, ref_state = nnx.split(reference)
    ref_state = nnx.as_pure(ref_state)  # plain arrays: nnx.scan refuses Variables from outside the trace

    def objective(m):
        ref = nnx.merge(ref_graphdef, ref_state)
        ref_sums = (reference_token_logps(m, batch, reference=ref) * batch["weights"]).sum(-1)
        return dpo_objective(m, batch, ref_sums, beta=0.1, loss_type="sigmoid")

    loss, metrics, grads = grads_of(policy, {"sigmoid": objective}, wrt=nnx.Param)["sigmoid"]
    assert abs(float(loss) - theirs.item()) < 1e-5, (float(loss), theirs.item())
    assert abs(float(metrics["reward_margin"])) > 1e-3
    nnx.update(policy, grads)
    ours = dict(hf_tensors(policy))
    assert set(ours) == set(torch_grads)
    for name, g in torch_grads.items():
        np.testing.assert_allclose(ours[name], g, rtol=0, atol=1e-5, err_msg=name)
    assert max(np.abs(g).max() for g in torch_grads.values()) > 1e-3


@pytest.mark.slow
def test_grpo_loss_and_gradient_equal_trl_grpo_trainer(hf_folder, adapted, tmp_path):
    """Fixed prompts, completions, rewards and old log-probs: TRL's GRPOTrainer computes the policy
    log-probs (at temperature 0.7) from the torch PeftModel and the loss with beta > 0; ours matches
    for TRL's default loss (dapo) and for grpo, with the same adapter gradients, kl and clip fraction.
    The rewards come from a real file, through our loader and through TRL's own reward call."""
    import datasets
    import transformers
    from trl.trainer.utils import nanstd

    (tmp_path / "rewards.py").write_text(REWARDS)
    rewards = load_rewards(["rewards.py:exact_answer", "rewards.py:short"], (1.0, 0.5), base=tmp_path)
    records = [
        {"prompt": [{"role": "user", "content": "2 plus 3?"}], "answer": "5"},
        {"prompt": [{"role": "user", "content": "What is 4 plus 4, in tags?"}], "answer": "8"},
    ]
    group = 3
    texts = [
        "<answer>5</answer>", "<answer>6</answer>", "five",
        "<answer>8</answer>", "I think <answer> 8 </answer>", "<answer>9</answer> or so",
    ]  # fmt: skip

    tok = transformers.AutoTokenizer.from_pretrained(hf_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, beta=0.05, epsilon=0.2,
        temperature=0.7, num_generations=group, per_device_train_batch_size=len(texts), max_completion_length=16,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=hf, reward_funcs=list(rewards.functions), args=args, processing_class=tok,
        train_dataset=datasets.Dataset.from_list(records), peft_config=lora_config(),
    )  # fmt: skip
    assert args.loss_type == "dapo"  # TRL 1.16's default, which objective.loss_type=none picks for grpo
    model, tensors = adapted
    load_adapters(trainer, tensors)

    ours = Tokenizer(hf_folder)
    prompts = [encode_prompt(r, ours) for r in records for _ in range(group)]
    completion_ids = [ours.encode(t, add_bos=False) + [ours.eos_id] for t in texts]
    completions = [ours.decode(c) for c in completion_ids]

    # Rewards: ours and TRL's own call of the same functions, then the weighted sum and the advantages.
    total, per = rewards.score(prompts, completions, completion_ids)
    inputs = [{"prompt": p.prompt, **p.fields} for p in prompts]
    chats = [[{"role": "assistant", "content": c}] for c in completions]
    theirs = trainer._calculate_rewards(inputs, [p.prompt for p in prompts], chats, completion_ids).numpy()
    np.testing.assert_array_equal(np.isnan(per), np.isnan(theirs))
    np.testing.assert_allclose(np.nan_to_num(per), np.nan_to_num(theirs), rtol=0, atol=1e-6)
    assert np.isnan(per[2, 0]) and per[4, 0] == 1.0  # "five" has no tag; " 8 " is stripped
    weighted = torch.tensor(theirs * np.array([1.0, 0.5], np.float32)).nansum(dim=1)
    np.testing.assert_allclose(total, weighted.numpy(), rtol=0, atol=1e-6)
    grouped = weighted.view(-1, group)
    advantages = (grouped - grouped.nanmean(dim=1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    np.testing.assert_allclose(group_advantages(total, group), advantages.reshape(-1).numpy(), rtol=0, atol=1e-5)
    adv = group_advantages(total, group)

    # TRL's inputs: prompts padded on the left, completions on the right.
    width = max(len(c) for c in completion_ids)
    prompt_width = max(len(p.ids) for p in prompts)
    prompt_ids = torch.tensor([[tok.pad_token_id] * (prompt_width - len(p.ids)) + p.ids for p in prompts])
    prompt_mask = torch.tensor([[0] * (prompt_width - len(p.ids)) + [1] * len(p.ids) for p in prompts])
    comp = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in completion_ids])
    comp_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completion_ids])

    seq_len = 64
    batch = {k: jnp.asarray(v) for k, v in completion_batch([p.ids for p in prompts], completion_ids, seq_len).items()}
    policy, ref = nnx.jit(
        lambda m: (token_logps(m, batch, temperature=0.7), reference_token_logps(m, batch, temperature=0.7))
    )(model)

    # Our [row, position] of completion token k is position len(prompt) - 1 + k.
    rows = np.repeat(np.arange(len(texts)), width)
    cols = np.array([len(p.ids) - 1 + k for p in prompts for k in range(width)]).clip(max=seq_len - 1)
    mask = comp_mask.numpy().astype(bool)

    def completion_aligned(x):
        return np.where(mask, np.asarray(x)[rows, cols].reshape(len(texts), width), 0.0).astype(np.float32)

    # Old log-probs: the current policy's, moved enough that some ratios leave [0.8, 1.2].
    policy = np.asarray(policy)
    noise = np.random.default_rng(0).normal(0, 0.3, policy.shape).astype(np.float32)
    old = np.where(np.asarray(batch["weights"]) > 0, policy + noise, 0.0)

    # Our reference (adapters off) equals TRL's (PeftModel.disable_adapter), both at temperature 0.7.
    with torch.no_grad(), trainer.model.disable_adapter():
        trl_ref = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, comp], 1), torch.cat([prompt_mask, comp_mask], 1), width
        )[0]
    np.testing.assert_allclose(completion_aligned(ref), np.where(mask, trl_ref.numpy(), 0), rtol=0, atol=2e-5)

    trl_inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": comp, "completion_mask": comp_mask,
        "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(completion_aligned(old)),
        "ref_per_token_logps": torch.tensor(completion_aligned(ref)), "num_items_in_batch": comp_mask.sum(),
    }  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1

    def objective(loss_type):
        def f(m):
            logps = token_logps(m, batch, temperature=0.7)
            return grpo_loss(
                logps, jnp.asarray(old), ref, jnp.asarray(adv), batch["weights"], beta=0.05, epsilon=0.2,
                loss_type=loss_type,
            )  # fmt: skip

        return f

    results = grads_of(model, {t: objective(t) for t in ("dapo", "grpo")})
    for loss_type, (loss, metrics, grads) in results.items():
        trainer.loss_type = loss_type
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        theirs = trainer._compute_loss(trainer.model, trl_inputs)
        theirs.backward()
        assert abs(float(loss) - theirs.item()) < 1e-5, (loss_type, float(loss), theirs.item())
        assert_grads_close(our_grads(model, grads), torch_grads(trainer))
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        assert abs(float(metrics["kl"]) - logged["kl"]) < 1e-6
        assert abs(float(metrics["clip_fraction"]) - logged["clip_ratio/region_mean"]) < 1e-6
    assert 0 < float(metrics["clip_fraction"]) < 1 and float(metrics["kl"]) > 1e-4


@pytest.mark.slow
def test_adapters_off_is_the_base_model(tiny_cfg):
    """lora.adapters_off gives the model before adaptation exactly, inside jit too, and switches back."""
    import dataclasses

    from lm.model import Transformer

    cfg = dataclasses.replace(tiny_cfg, dtype="float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    forward = nnx.jit(lambda m: m(tokens, positions))
    base = np.asarray(forward(model))
    lora.apply(model, SPEC)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: x + 0.2, state))
    adapted_out = np.asarray(forward(model))
    assert np.abs(adapted_out - base).max() > 1e-2
    with lora.adapters_off(model):
        np.testing.assert_array_equal(np.asarray(forward(model)), base)
    np.testing.assert_array_equal(np.asarray(forward(model)), adapted_out)


def test_dpo_loss_by_hand():
    """sigmoid and ipo on hand-picked log-prob sums, against the formulas written out in numpy."""
    from lm.train.objectives import dpo_loss

    logps = jnp.array([-3.0, -7.0, -5.0, -4.0])  # chosen 0, 1; rejected 0, 1
    ref = jnp.array([-4.0, -6.0, -5.5, -3.0])
    tokens = jnp.array([2.0, 5.0, 3.0, 4.0])
    d_c, d_r = np.array([1.0, -1.0]), np.array([0.5, -1.0])
    loss, m = dpo_loss(logps, ref, tokens, beta=0.5, loss_type="sigmoid")
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-0.5 * (d_c - d_r)))), rtol=1e-6)
    np.testing.assert_allclose(float(m["reward_margin"]), np.mean(0.5 * (d_c - d_r)), rtol=1e-6)
    assert float(m["reward_accuracy"]) == 0.5
    loss, _ = dpo_loss(logps, ref, tokens, beta=0.5, loss_type="ipo")
    np.testing.assert_allclose(float(loss), np.mean((d_c / [2, 5] - d_r / [3, 4] - 1.0) ** 2), rtol=1e-6)


def test_group_advantages_handle_flat_and_unscorable_groups():
    adv = group_advantages(np.array([1.0, 1.0, 1.0, 0.0, np.nan, 2.0]), 3)
    np.testing.assert_array_equal(adv[:3], 0.0)  # a flat group teaches nothing
    assert adv[4] == 0.0 and adv[3] < 0 < adv[5]  # an unscorable completion gets advantage 0
    np.testing.assert_allclose(adv[5], 1.0 / (np.std([0.0, 2.0], ddof=1) + 1e-4), rtol=1e-6)


def test_preference_data_from_strings_and_files(tmp_path):
    """String pairs: TRL's rule (the tokenizer's BOS, EOS after each completion), the completion
    starting where prompt and prompt + completion first differ; the batch masks only completions."""
    spm = tmp_path / "spm"
    from hf_builders import spm_folder

    tok = Tokenizer(spm_folder(spm))
    path = tmp_path / "pairs.jsonl"
    records = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " made of cheese."},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = read_pairs([path], tok)
    first = pairs[0]
    assert first.prompt[0] == tok.bos_id and first.chosen[-1] == tok.eos_id == first.rejected[-1]
    assert first.prompt + first.chosen == tok.encode("The sky is blue.") + [tok.eos_id]
    implicit = pairs[1]  # no prompt: the shared first turn is the prompt, rendered with the generation prompt
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tok.decode(implicit.prompt) == tok.decode(tok.encode(prompt_text, add_bos=False))
    assert "Hello!" in tok.decode(implicit.chosen) and "Go away." in tok.decode(implicit.rejected)

    batch = pair_batch(pairs, 40)
    assert batch["tokens"].shape == (4, 40)
    for row, (pair, which) in enumerate([(p, "chosen") for p in pairs] + [(p, "rejected") for p in pairs]):
        completion = getattr(pair, which)
        np.testing.assert_array_equal(batch["targets"][row][batch["weights"][row] > 0], completion)
    with pytest.raises(UserError, match="all strings or all lists"):
        encode_pair({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}, tok, "x:1")
    with pytest.raises(UserError, match="ends with an assistant turn"):
        encode_prompt({"messages": records[1]["chosen"]}, tok, "x:2")
    (tmp_path / "prompts.jsonl").write_text(
        '{"prompt": "2 + 2 =", "answer": 4}\n\n{"messages": [{"role": "user", "content": "Hi"}]}\n'
    )
    prompt, chat = read_prompts([tmp_path / "prompts.jsonl"], tok)
    assert prompt.fields == {"answer": 4} and prompt.ids == tok.encode("2 + 2 =") and not prompt.conversational
    assert chat.conversational and chat.ids == tok.encode(prompt_text, add_bos=False) and chat.fields == {}
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no preference records"):
        read_pairs([tmp_path / "empty.jsonl"], tok)


def test_reward_loading_errors_are_one_line(tmp_path):
    (tmp_path / "r.py").write_text(textwrap.dedent(REWARDS))
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    (tmp_path / "bad.py").write_text("def wrong(prompts, completions, **kw):\n    return [1.0]\n")
    cases = [
        (["missing.py:f"], "missing.py does not exist"),
        (["r.py:nope"], "defines no function 'nope'"),
        (["broken.py:f"], "importing .* failed: ModuleNotFoundError"),
        (["r.py"], 'must look like "FILE.py:FUNCTION"'),
    ]
    for specs, message in cases:
        with pytest.raises(UserError, match=message) as e:
            load_rewards(specs, base=tmp_path)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="one per reward|entries for"):
        load_rewards(["r.py:short"], (1.0, 2.0), base=tmp_path)
    rewards = load_rewards([str(pathlib.Path(tmp_path / "bad.py")) + ":wrong"])
    from lm.data.preference import Prompt

    with pytest.raises(UserError, match="returned 1 rewards for 2 completions"):
        rewards.score([Prompt([1], "p", {})] * 2, ["a", "b"], [[1], [2]])
    (tmp_path / "strict.py").write_text("def f(prompts, completions):\n    return [0.0] * len(completions)\n")
    with pytest.raises(UserError, match="give it \\*\\*kwargs"):
        load_rewards(["strict.py:f"], base=tmp_path).score([Prompt([1], "p", {})], ["a"], [[1]])


@pytest.mark.slow
def test_dpo_train_step_learns_synthetic_preferences(tiny_cfg):
    """dpo_train_step on LoRA: at step 0 the policy is the reference (loss log 2, margin 0); within a
    few steps the chosen completions (tokens from one range) beat the rejected (another) on more than
    90% of pairs, the margin grows, and the frozen base never moves."""
    import dataclasses

    from lm.config import OptimizerConfig
    from lm.data.preference import Pair
    from lm.model import Transformer
    from lm.state.optimizer import make_optimizer
    from lm.train.step import dpo_train_step

    model = Transformer(dataclasses.replace(tiny_cfg, dtype="float32", max_seq_len=32, n_layers=1), rngs=nnx.Rngs(0))
    lora.apply(model, SPEC)
    base = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, lora.FROZEN))]
    rng = np.random.default_rng(0)
    pairs = [
        Pair(
            list(rng.integers(4, 100, 6)), list(rng.integers(100, 140, 5)) + [3], list(rng.integers(140, 180, 5)) + [3]
        )
        for _ in range(8)
    ]
    batch = {k: jnp.asarray(v) for k, v in pair_batch(pairs, 16).items()}
    opt = make_optimizer(model, OptimizerConfig(lr=2e-2, warmup_steps=0, weight_decay=0.0), 20, wrt=nnx.LoRAParam)
    rows = [dpo_train_step(model, opt, batch, beta=0.1, loss_type="sigmoid") for _ in range(12)]
    assert abs(float(rows[0]["loss"]) - np.log(2)) < 1e-6 and float(rows[0]["reward_margin"]) == 0.0
    assert float(rows[-1]["reward_accuracy"]) > 0.9
    margins = [float(r["reward_margin"]) for r in rows]
    assert margins[-1] > margins[3] > 0 and float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 0.1
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, lora.FROZEN))]
    assert all(np.array_equal(a, b) for a, b in zip(base, after))


@pytest.mark.slow
def test_grpo_rollout_and_steps_move_the_policy_toward_high_advantage(hf_folder, adapted, tmp_path):
    """rollout samples with the decode loop on the LoRA policy in place and scores with a reward file;
    grpo_train_step's first loss (ratio 1) is sum(-A_i + beta k3) over the completion tokens / N, with
    k3 from the rollout's own old and reference log-probs; three passes over the rollout
    (objective.iterations=3) raise the log-probs of the completions with positive advantage relative
    to those with negative advantage."""
    from lm.config import OptimizerConfig
    from lm.state.optimizer import make_optimizer
    from lm.train.objectives import rollout
    from lm.train.step import grpo_train_step

    (tmp_path / "r.py").write_text(
        "def even(completion_ids, **kw):\n    return [sum(i % 2 == 0 for i in c) / len(c) for c in completion_ids]\n"
    )
    rewards = load_rewards(["r.py:even"], base=tmp_path)
    tok = Tokenizer(hf_folder)
    model = nnx.clone(adapted[0])  # the steps donate and update it; the fixture stays as it is
    prompts = [encode_prompt({"prompt": t}, tok) for t in ("one two", "three four", "five six", "seven eight")]
    opt = make_optimizer(model, OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0), 10, wrt=nnx.LoRAParam)
    r = rollout(model, tok, prompts, rewards, group_size=4, max_new_tokens=8, temperature=1.0, seed=0, seq_len=32,
                beta=0.04)  # fmt: skip
    assert len(r.completions) == 16 and all(1 <= len(c) <= 8 for c in r.completion_ids)
    np.testing.assert_allclose(r.rewards, [np.mean([i % 2 == 0 for i in c]) for c in r.completion_ids], rtol=1e-6)
    w = np.asarray(r.batch["weights"])
    n = w.sum(-1)
    delta = np.asarray(r.ref_logps, np.float64) - np.asarray(r.old_logps, np.float64)
    k3 = (np.exp(delta) - delta - 1) * w
    assert k3.sum() > 1e-3  # the random adapters moved the policy off the reference
    for iteration in range(3):
        out = grpo_train_step(model, opt, r.batch, r.old_logps, r.ref_logps, jnp.asarray(r.advantages),
                              beta=0.04, epsilon=0.2, temperature=1.0, loss_type="dapo")  # fmt: skip
        if iteration == 0:
            expected = ((-r.advantages * n).sum() + 0.04 * k3.sum()) / n.sum()
            assert abs(float(out["loss"]) - expected) < 1e-5, (float(out["loss"]), expected)
            assert abs(float(out["kl"]) - k3.sum() / n.sum()) < 1e-5 and float(out["clip_fraction"]) == 0.0
    after = nnx.jit(lambda m: token_logps(m, r.batch))(model)
    change = (np.asarray(after) - np.asarray(r.old_logps)).sum(-1) / n
    assert (r.advantages * change).sum() > 0
    assert change[r.advantages > 0].mean() > change[r.advantages < 0].mean()


@pytest.mark.slow
def test_grpo_step_follows_the_advantage_and_rollouts_sample_the_live_adapters(hf_folder, adapted):
    """The decode loop that rollout samples with reads the adapters as they are now: greedy tokens are
    the argmax of the live policy's logits, before and after an optimizer step, and differ from the
    base's (adapters off). One grpo_train_step on a fixed group of two completions raises the
    log-prob of the rewarded one and lowers the other's."""
    from lm.config import OptimizerConfig
    from lm.infer.decode import generate
    from lm.infer.sampling import Sampling
    from lm.state.optimizer import make_optimizer
    from lm.train.step import grpo_train_step

    tok = Tokenizer(hf_folder)
    prompt = encode_prompt({"prompt": "one two"}, tok).ids
    logps = nnx.jit(lambda m, b: token_logps(m, b))
    forward = nnx.jit(lambda m, b: m(b["tokens"], b["positions"], b["segment_ids"]))

    def greedy(m) -> list[int]:
        ids = generate(m, [prompt], max_new_tokens=6, sampling=Sampling(), seed=0).tokens[0]
        b = {k: jnp.asarray(v) for k, v in completion_batch([prompt], [ids], 16).items()}
        logits = np.asarray(forward(m, b))
        assert ids == logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ids)].argmax(-1).tolist()
        return ids

    eos = tok.eos_id
    group = [[40, 41, 42, eos], [50, 51, eos]]
    batch = {k: jnp.asarray(v) for k, v in completion_batch([prompt, prompt], group, 16).items()}
    model = nnx.clone(adapted[0])  # the step donates and updates it; the fixture stays as it is
    with lora.adapters_off(model):
        base = greedy(model)
    assert greedy(model) != base
    advantages = group_advantages(np.asarray([1.0, 0.0]), 2)
    old = logps(model, batch)
    opt = make_optimizer(model, OptimizerConfig(lr=3e-2, warmup_steps=0, weight_decay=0.0), 10, wrt=nnx.LoRAParam)
    out = grpo_train_step(model, opt, batch, old, None, jnp.asarray(advantages),
                          beta=0.0, epsilon=0.2, temperature=1.0, loss_type="dapo")  # fmt: skip
    assert float(out["clip_fraction"]) == 0.0  # ratio 1 on the step that sampled them
    change = np.asarray((logps(model, batch) - old).sum(-1))
    assert change[0] > 0 > change[1], change
    greedy(model)  # the updated adapters decode


@pytest.mark.slow
def test_chunked_token_logps_equal_whole_logits(tiny_cfg):
    """token_logps chunked along the sequence (model.loss_chunk; 5 does not divide 14) gives the
    unchunked values and gradients, at temperature 0.7 and with a final soft-cap."""
    import dataclasses

    from lm.model import Transformer

    cfg = dataclasses.replace(tiny_cfg, dtype="float32", n_layers=1, final_softcap=3.0)
    whole, chunked = (Transformer(dataclasses.replace(cfg, loss_chunk=c), rngs=nnx.Rngs(0)) for c in (0, 5))
    assert chunked.cfg.loss_chunk_for(14) == 5 and whole.cfg.loss_chunk_for(14) == 0
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, 15), 0, cfg.vocab_size))
    batch = {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "positions": jnp.broadcast_to(jnp.arange(14), (3, 14)),
        "segment_ids": jnp.ones((3, 14), jnp.int32),
        "weights": jnp.asarray(np.random.default_rng(0).integers(0, 2, (3, 14)), jnp.float32),
    }

    @nnx.jit
    def value_and_grad(m):
        return nnx.value_and_grad(lambda m: (token_logps(m, batch, 0.7) * batch["weights"]).sum())(m)

    def jaxpr(m):
        graphdef, state = nnx.split(m)
        return str(jax.make_jaxpr(lambda s: token_logps(nnx.merge(graphdef, s), batch, 0.7))(state))

    full_logits = f"f32[3,14,{cfg.vocab_size}]"
    assert full_logits in jaxpr(whole) and full_logits not in jaxpr(chunked)  # the chunked path is taken
    (a, ga), (b, gb) = value_and_grad(whole), value_and_grad(chunked)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)


def test_objective_section_sets_and_refuses_with_one_line_errors():
    from lm.config import Recipe, apply_overrides

    r = apply_overrides(Recipe(), ["train.objective=dpo", "objective.beta=0.3", "objective.loss_type=ipo"])
    assert (r.train.objective, r.objective.beta, r.objective.loss_for("dpo")) == ("dpo", 0.3, "ipo")
    r = apply_overrides(
        Recipe(),
        ["train.objective=grpo", 'objective.rewards=["r.py:a","r.py:b"]', "objective.reward_weights=[1,0.5]",
         "objective.group_size=4", "objective.iterations=2"],
    )  # fmt: skip
    assert r.objective.rewards == ("r.py:a", "r.py:b") and r.objective.reward_weights == (1.0, 0.5)
    assert r.objective.loss_for("grpo") == "dapo" and Recipe.from_dict(r.to_dict()) == r
    assert Recipe().train.objective == "sft" and Recipe().objective.loss_for("dpo") == "sigmoid"
    bad = [
        (["train.objective=ppo"], "not one of"),
        (["train.objective=grpo"], "needs objective.rewards"),
        (["objective.rewards=r.py"], "FILE.py:FUNCTION"),
        (["train.objective=dpo", "objective.loss_type=dapo"], "must be one of \\['sigmoid', 'ipo'\\] for dpo"),
        (["objective.rewards=r.py:f", "objective.reward_weights=[1,2]"], "one weight per reward"),
        (["train.objective=grpo", "objective.rewards=r.py:f", "objective.group_size=3"], "not divisible"),
        (["train.objective=grpo", "objective.rewards=r.py:f", "objective.group_size=1"], "must be >= 2"),
        (["train.objective=dpo", "objective.beta=0"], "must be positive for dpo"),
        (["objective.epsilon=1.5"], "must be in \\(0, 1\\)"),
        (["objective.temperature=0"], "must be positive"),
    ]
    for sets, message in bad:
        with pytest.raises(UserError, match=message) as e:
            apply_overrides(Recipe(), sets)
        assert "\n" not in str(e.value)
