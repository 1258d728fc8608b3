"""PEFT export (lm.hf.peft) checked by peft itself: AutoPeftModelForCausalLM resolves the base from
the adapter config alone and gives our logits, also for adapters on only some layers of an unscanned run."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from lm import lora
from lm.config import LoraConfig
from lm.hf import load_hf, save_peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from hf_builders import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("peft") / "base", None, vocab_size=256, context=32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "targets, expect",
    [
        (r".*blocks\.1\.attn\.(query|value)", {"layers_to_transform": [1], "target_modules": ["q_proj", "v_proj"]}),
        (r".*blocks\.(0\.attn\.query|1\.mlp\.up)", {"target_modules": "model\\.layers\\.0\\.self_attn\\.q_proj|"
                                                    "model\\.layers\\.1\\.mlp\\.up_proj"}),
    ],
)  # fmt: skip
def test_partial_layer_adapters_export_as_peft_loads_them(base, tmp_path, targets, expect):
    model = load_hf(base, scan_layers=False)
    spec = LoraConfig(rank=4, alpha=8.0, targets=targets, dropout=0.1, base_dtype="float32")
    paths = lora.apply(model, spec, seed=0)
    assert paths and len(paths) < 2 * 7  # only some of the projections of the two layers
    for module in lora.adapters(model).values():  # B starts at zero; make the adapters matter
        module.lora_b[...] = jax.random.normal(jax.random.key(1), module.lora_b.shape) * 0.3
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
    ours = np.asarray(model(tokens, np.broadcast_to(np.arange(12), tokens.shape)))

    save_peft(model, spec, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in expect} == expect and config["lora_dropout"] == 0.1
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32).eval()
    adapted = [
        n for n, m in theirs.named_modules() if n.endswith(("q_proj", "v_proj", "up_proj")) and hasattr(m, "lora_A")
    ]
    assert len(adapted) == len(paths), adapted
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)
    assert nnx.state(model, nnx.LoRAParam)  # still unmerged: the export reads the adapters only


@pytest.mark.slow
def test_adapters_on_a_scanned_stack_of_dense_and_expert_layers_export_as_peft(tmp_path):
    """Qwen2-MoE with experts in every second layer, scanned in runs (lm.model.layer_paths): each
    adapter's layers come out under their own Hugging Face layer index."""
    from hf_models import save_hf_checkpoint

    save_hf_checkpoint("qwen2_moe", tmp_path / "base")
    model = load_hf(tmp_path / "base", scan_layers=True)
    spec = LoraConfig(rank=4, alpha=8.0, base_dtype="float32")  # attention, dense layers' MLPs, layer 1's experts
    lora.apply(model, spec, seed=0)
    for module in lora.adapters(model).values():
        module.lora_b[...] = jax.random.normal(jax.random.key(1), module.lora_b.shape) * 0.3
    tokens = np.random.default_rng(0).integers(0, 160, (2, 12))
    ours = np.asarray(model(tokens, np.broadcast_to(np.arange(12), tokens.shape)))
    save_peft(model, spec, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32).eval()
    adapted = sorted(n.split(".layers.")[1] for n, m in theirs.named_modules() if hasattr(m, "lora_A"))
    dense_mlp = [f"{i}.mlp.{p}_proj" for i in (0, 2) for p in ("down", "gate", "up")]
    attention = [f"{i}.self_attn.{p}_proj" for i in range(3) for p in ("k", "o", "q", "v")]
    experts = ["1.mlp.experts", "1.mlp.experts.base_layer"]  # down_proj's ParamWrapper around gate_up_proj's
    assert adapted == sorted(dense_mlp + attention + experts)
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, targets",
    [
        ("mixtral", None),  # the default targets: attention and every expert
        ("qwen2_moe", r".*(attn\.(query|value)|mlp\.(shared\.)?(gate|up|down))"),  # and the shared expert
    ],
)
def test_expert_adapters_export_as_peft_target_parameters_and_merged(family, targets, tmp_path):
    """Per-expert adapters load into transformers 5's fused experts through peft's own loader, and the
    merged export loads in transformers: both give our logits."""
    import transformers
    from hf_models import hf_logits, sample_tokens, save_hf_checkpoint

    from lm.hf import save_hf

    save_hf_checkpoint(family, tmp_path / "base")
    model = load_hf(tmp_path / "base", dtype="float32", param_dtype="float32")
    spec = LoraConfig(rank=4, alpha=8.0, base_dtype="float32", **({"targets": targets} if targets else {}))
    lora.apply(model, spec, seed=0)
    assert any(isinstance(m, lora.ExpertLoRA) for m in lora.adapters(model).values())  # qwen2_moe: layer 1's
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    tokens = sample_tokens()
    ours = np.asarray(model(tokens, np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)))

    save_peft(model, spec, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    plain = hf_logits(base, tokens)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_logits(theirs, tokens), ours, atol=1e-4)
    assert np.abs(plain - ours).max() > 0.1  # the adapters mattered

    save_hf(lora.merge(model), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(merged, tokens), ours, atol=1e-4)
