"""PEFT export: a LoRA run's adapters as `peft` saves them (adapter_model.safetensors and
adapter_config.json), named after the Hugging Face modules of the family's mapping table.

Expert adapters (Mixtral, Qwen2-MoE, Qwen3-MoE) are written as PEFT 0.21 saves LoRA on transformers
5's fused expert parameters (`target_parameters`, `peft.tuners.lora.ParamWrapper`): `gate_up_proj`
[experts, 2 d_ff, d] and `down_proj` [experts, d, d_ff] of `mlp.experts`. Our gate and up adapters,
rank r each, become one rank-2r adapter of gate_up_proj (A stacked along the rank, B block-diagonal;
rank and alpha doubled, so the scale alpha/r holds), which computes the same x W_e + scale (x A_e) B_e.
(PEFT's loader also converts transformers 4's per-expert names, but not for Qwen2-MoE itself.)"""

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
from lm.lora import ExpertLoRA, adapters
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
    found = {path: (module, *_located(path, cfg)) for path, module in adapters(model).items()}
    tensors, modules, by_layer = {}, set(), {}
    rng = np.random.default_rng(0)
    experts = {p: v for p, v in found.items() if isinstance(v[0], ExpertLoRA)}
    if experts:
        tensors.update(_fused_experts(experts, cfg, spec.rank))
    for path, (module, sub, layers) in found.items():
        if path in experts:
            continue
        rule = rules.get(sub + ".kernel")
        if not layers or rule is None:
            raise UserError(f"adapter on {path} has no Hugging Face module to export to; adapt only block projections")
        a, b = np.asarray(jax.device_get(module.lora_a[...])), np.asarray(jax.device_get(module.lora_b[...]))
        stacked = layers[0][1] is not None
        in_shape, out_shape = a.shape[int(stacked) : -1], b.shape[int(stacked) + 1 :]
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
        **(EXPERT_TARGETS(spec) if experts else {}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return tensors, config


def _located(path: str, cfg) -> tuple[str, list[tuple[int, int | None]]]:
    """An adapter's path inside a Block, and the layers it serves: [(layer, its index on the stack's
    leading axis, or None for an unstacked Block)] (lm.model.layer_paths)."""
    parts = tuple(int(p) if p.isdigit() else p for p in path.split("."))
    where = layer_paths(cfg)
    layers = [(i, index) for i, (prefix, index) in enumerate(where) if parts[: len(prefix)] == prefix]
    prefix = where[layers[0][0]][0] if layers else ()
    return ".".join(map(str, parts[len(prefix) :])), layers


EXPERTS = "model.layers.{i}.mlp.experts"  # transformers 5's module holding the fused expert parameters


def EXPERT_TARGETS(spec: LoraConfig) -> dict:  # noqa: N802 - a table, as a function of the spec
    """The config keys of the expert adapters: both parameters, gate_up_proj at twice the rank and alpha."""
    fused = r".*\.gate_up_proj"
    return {
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "rank_pattern": {fused: 2 * spec.rank},
        "alpha_pattern": {fused: 2 * spec.alpha},
    }


def _fused_experts(experts: dict, cfg, rank: int) -> dict[str, np.ndarray]:
    """PEFT's ParamWrapper tensors for every MoE layer: gate_up_proj's wrapper (the inner one, hence
    `base_layer`) and down_proj's. A [experts * r, in] is expert-major, B [out, r * experts] rank-major
    (ParamWrapper.get_delta_weight reshapes them so). A projection without an adapter gets zeros."""
    n_e, d, f = cfg.n_experts, cfg.d_model, cfg.expert_d_ff
    factors = {}  # (layer, gate|up|down) -> (a [experts, in, r], b [experts, r, out])
    for module, sub, layers in experts.values():
        a, b = np.asarray(jax.device_get(module.lora_a[...])), np.asarray(jax.device_get(module.lora_b[...]))
        for i, index in layers:
            factors[i, sub.rsplit(".", 1)[-1]] = (a, b) if index is None else (a[index], b[index])
    zero = {"gate": (d, f), "up": (d, f), "down": (f, d)}
    tensors = {}
    for i in sorted({i for i, _ in factors}):
        a, b = {}, {}
        for name, (n_in, n_out) in zero.items():
            a[name], b[name] = factors.get((i, name), (np.zeros((n_e, n_in, rank)), np.zeros((n_e, rank, n_out))))
        a_up = np.concatenate([a["gate"], a["up"]], axis=-1)  # [experts, d, 2r]
        b_up = np.zeros((n_e, 2 * rank, 2 * f), np.float32)  # block-diagonal: gate's rank to gate's rows
        b_up[:, :rank, :f], b_up[:, rank:, f:] = b["gate"], b["up"]
        prefix = f"base_model.model.{EXPERTS.format(i=i)}"
        for key, (ae, be) in {f"{prefix}.base_layer": (a_up, b_up), prefix: (a["down"], b["down"])}.items():
            r = ae.shape[-1]
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(ae.transpose(0, 2, 1).reshape(n_e * r, -1))
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(be.transpose(2, 1, 0).reshape(-1, r * n_e))
    return {k: v.astype(np.float32) for k, v in tensors.items()}


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
