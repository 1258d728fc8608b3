"""PEFT export: a LoRA run's adapters as `peft` saves them (adapter_model.safetensors and
adapter_config.json), named after the Hugging Face modules of the family's mapping table."""

import json
import math
import pathlib
import re

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from lm.config import LoraConfig
from lm.errors import UserError
from lm.hf.convert import FAMILIES, family_of
from lm.lora import adapters
from lm.model import layer_paths


def peft_adapter(model: nnx.Module, spec: LoraConfig) -> tuple[dict, dict]:
    """(tensors, adapter_config) in PEFT's LoRA format.

    PEFT computes W x + (alpha / r) B_hf A_hf x with A_hf [r, in] and B_hf [out, r] on the HF weight
    W [out, in]. Our kernels are W^T with the in and out axes possibly split into heads ([d_model,
    heads, head_dim], [heads, head_dim, d_model]); the family's mapping table flattens them in C order,
    which is checked here for each projection, so A_hf = A.reshape(in, r).T, B_hf = B.reshape(r, out).T.
    """
    cfg = model.cfg
    family = family_of(cfg)
    if family == "gpt2":
        raise UserError("--adapter-only does not support GPT-2 (fused c_attn Conv1D); export the merged model instead")
    rules = {r.ours[0]: r for r in FAMILIES[family].rules if "{i}" in r.hf and "{e}" not in r.hf and len(r.ours) == 1}
    tensors, modules, by_layer = {}, set(), {}
    rng = np.random.default_rng(0)
    where = layer_paths(cfg)
    for path, module in adapters(model).items():
        parts = tuple(int(p) if p.isdigit() else p for p in path.split("."))
        # The layers this module serves: one Block, or a stack of them (index: each one's slice).
        layers = [(i, index) for i, (prefix, index) in enumerate(where) if parts[: len(prefix)] == prefix]
        prefix = where[layers[0][0]][0] if layers else ()
        rule = rules.get(".".join(map(str, parts[len(prefix) :])) + ".kernel")
        if not layers or rule is None:
            raise UserError(f"adapter on {path} has no Hugging Face module to export to; adapt only block projections")
        a, b = np.asarray(jax.device_get(module.lora_a[...])), np.asarray(jax.device_get(module.lora_b[...]))
        stacked = layers[0][1] is not None
        in_shape = a.shape[(1 if stacked else 0) : -1]
        out_shape = b.shape[(2 if stacked else 1) :]
        probe = rng.standard_normal(in_shape + out_shape).astype(np.float32)
        if not np.array_equal(rule.transform.save((probe,), cfg), probe.reshape(math.prod(in_shape), -1).T):
            raise UserError(f"the Hugging Face layout of {rule.hf} is not a plain transpose; cannot export its adapter")
        name = rule.hf[: -len(".weight")]
        modules.add(name.rsplit(".", 1)[-1])
        for i, index in layers:
            by_layer.setdefault(i, set()).add(name.format(i=i))
            ai, bi = (a, b) if index is None else (a[index], b[index])
            prefix = f"base_model.model.{name.format(i=i)}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, spec.rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(bi.reshape(spec.rank, -1).T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        **_targets(by_layer, modules, cfg.n_layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return tensors, config


def _targets(by_layer: dict[int, set[str]], modules: set[str], n_layers: int) -> dict:
    """PEFT's target keys for the adapted modules: their names (every layer), their names with
    layers_to_transform (the same modules on some layers: an unscanned run's partial targets
    regex), or else a regex of the exact module paths, which PEFT full-matches."""
    kinds = {frozenset(n.rsplit(".", 1)[-1] for n in names) for names in by_layer.values()}
    if len(kinds) == 1 and len(by_layer) == n_layers:
        return {"target_modules": sorted(modules)}
    if len(kinds) == 1:
        return {"target_modules": sorted(modules), "layers_to_transform": sorted(by_layer), "layers_pattern": "layers"}
    paths = sorted(n for names in by_layer.values() for n in names)
    return {"target_modules": "|".join(re.escape(n) for n in paths)}


def save_peft(model: nnx.Module, spec: LoraConfig, out_dir, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors and adapter_config.json (what peft's save_pretrained writes).
    base_model_name_or_path: the Hugging Face folder the base came from, absolute, so that
    AutoPeftModelForCausalLM finds it (lm.state.source.adapter_base)."""
    tensors, config = peft_adapter(model, spec)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config["base_model_name_or_path"] = base_model_name_or_path
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
