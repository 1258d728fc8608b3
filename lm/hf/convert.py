"""Hugging Face checkpoints in and out: config.json <-> ModelConfig, *.safetensors <-> parameters.

Each family has one mapping table from Hugging Face tensor names to our parameter paths, with the
transform between the two layouts. Import and export read the same table in opposite directions,
so they cannot drift apart. Every tensor in a checkpoint is used exactly once: a missing or
leftover tensor is an error, never silently skipped.

Import builds the abstract model (`nnx.eval_shape`), reads each parameter's final NamedSharding,
and puts tensors on the devices one at a time; a stacked [layers, ...] parameter is assembled on
the devices layer by layer, so the host never holds more than one tensor (plus its transposed copy).
"""

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm.config import EXECUTION, MeshConfig, ModelConfig
from lm.errors import UserError
from lm.model import Transformer, layer_paths
from lm.model.attention import yarn_mscale
from sharding.mesh import Layout
from sharding.partition import check_divisible, to_host

# ------------------------------------------------------------------------------------------------
# Layout transforms: `load` maps one HF tensor to our parameters (a tuple: a fused HF tensor feeds
# several), `save` maps them back. Torch Linear weights are [out, in]; our kernels are [in, out]
# with heads split out: q/k/v [d_model, heads, head_dim], the output projection [heads, head_dim, d_model].


class Transform(NamedTuple):
    load: Callable[[np.ndarray, ModelConfig], tuple[np.ndarray, ...]]
    save: Callable[[tuple[np.ndarray, ...], ModelConfig], np.ndarray]


def _heads(count: Callable[[ModelConfig], int]) -> Transform:
    """q/k/v projection weight [heads * head_dim, d_model] <-> kernel [d_model, heads, head_dim]."""
    return Transform(
        lambda w, c: (w.T.reshape(c.d_model, count(c), c.dim_per_head),),
        lambda a, c: a[0].reshape(c.d_model, -1).T,
    )


def _head_bias(count: Callable[[ModelConfig], int]) -> Transform:
    return Transform(lambda w, c: (w.reshape(count(c), c.dim_per_head),), lambda a, c: a[0].reshape(-1))


def _q(c):
    return c.n_heads


def _kv(c):
    return c.n_kv_heads


SAME = Transform(lambda w, c: (w,), lambda a, c: a[0])
LINEAR = Transform(lambda w, c: (w.T,), lambda a, c: a[0].T)
Q, KV, Q_BIAS, KV_BIAS = _heads(_q), _heads(_kv), _head_bias(_q), _head_bias(_kv)
OUT = Transform(
    lambda w, c: (w.T.reshape(c.n_heads, c.dim_per_head, c.d_model),),
    lambda a, c: a[0].reshape(-1, c.d_model).T,
)
# GPT-2's Conv1D stores weights [in, out]: the MLP kernels are ours as they are; c_attn fuses q, k, v.
CONV_OUT = Transform(
    lambda w, c: (w.reshape(c.n_heads, c.dim_per_head, c.d_model),), lambda a, c: a[0].reshape(-1, c.d_model)
)
QKV = Transform(
    lambda w, c: tuple(p.reshape(c.d_model, c.n_heads, c.dim_per_head) for p in np.split(w, 3, axis=1)),
    lambda a, c: np.concatenate([x.reshape(c.d_model, -1) for x in a], axis=1),
)
QKV_BIAS = Transform(
    lambda w, c: tuple(p.reshape(c.n_heads, c.dim_per_head) for p in np.split(w, 3)),
    lambda a, c: np.concatenate([x.reshape(-1) for x in a]),
)


class Rule(NamedTuple):
    hf: str  # tensor name; {i} stands for the layer index, {e} for the expert (layers with experts only)
    ours: tuple[str, ...]  # our parameter paths (inside a block when hf has {i})
    transform: Transform = SAME
    dense_only: bool = False  # a dense MLP's tensor in a family whose other layers have experts


def _layer(prefix: str, table: dict) -> tuple[Rule, ...]:
    """Rules for one block's tensors: {hf name: our path, or (our path, transform)}."""
    rules = []
    for name, ours in table.items():
        path, *transform = (ours,) if isinstance(ours, str) else ours
        rules.append(Rule(prefix + name, (path,), *transform))
    return tuple(rules)


_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "self_attn.q_proj.weight": ("attn.query.kernel", Q),
    "self_attn.k_proj.weight": ("attn.key.kernel", KV),
    "self_attn.v_proj.weight": ("attn.value.kernel", KV),
    "self_attn.o_proj.weight": ("attn.out.kernel", OUT),
    "self_attn.q_proj.bias": ("attn.query.bias", Q_BIAS),
    "self_attn.k_proj.bias": ("attn.key.bias", KV_BIAS),
    "self_attn.v_proj.bias": ("attn.value.bias", KV_BIAS),
    "self_attn.o_proj.bias": "attn.out.bias",
    "self_attn.q_norm.weight": "attn.query_ln.scale",  # Qwen3
    "self_attn.k_norm.weight": "attn.key_ln.scale",
    "mlp.gate_proj.weight": ("mlp.gate.kernel", LINEAR),
    "mlp.up_proj.weight": ("mlp.up.kernel", LINEAR),
    "mlp.down_proj.weight": ("mlp.down.kernel", LINEAR),
    "mlp.gate_proj.bias": "mlp.gate.bias",
    "mlp.up_proj.bias": "mlp.up.bias",
    "mlp.down_proj.bias": "mlp.down.bias",
}
_LLAMA_TOP = (
    Rule("model.embed_tokens.weight", ("embed.embedding",)),
    Rule("model.norm.weight", ("final_norm.scale",)),
    Rule("lm_head.weight", ("lm_head.kernel",), LINEAR),
)
LLAMA = _LLAMA_TOP + _layer("model.layers.{i}.", _LLAMA_LAYER)
# Gemma 2 names its four norms differently: post_attention_layernorm is the attention's post-norm.
GEMMA2 = _LLAMA_TOP + _layer(
    "model.layers.{i}.",
    {
        **_LLAMA_LAYER,
        "post_attention_layernorm.weight": "attn_post_norm.scale",
        "pre_feedforward_layernorm.weight": "mlp_norm.scale",
        "post_feedforward_layernorm.weight": "mlp_post_norm.scale",
    },
)
GPT2 = (
    Rule("transformer.wte.weight", ("embed.embedding",)),
    Rule("transformer.wpe.weight", ("pos_embed.embedding",)),
    Rule("transformer.ln_f.weight", ("final_norm.scale",)),
    Rule("transformer.ln_f.bias", ("final_norm.bias",)),
    Rule("lm_head.weight", ("lm_head.kernel",), LINEAR),
    Rule("transformer.h.{i}.attn.c_attn.weight", ("attn.query.kernel", "attn.key.kernel", "attn.value.kernel"), QKV),
    Rule("transformer.h.{i}.attn.c_attn.bias", ("attn.query.bias", "attn.key.bias", "attn.value.bias"), QKV_BIAS),
) + _layer(
    "transformer.h.{i}.",
    {
        "ln_1.weight": "attn_norm.scale",
        "ln_1.bias": "attn_norm.bias",
        "ln_2.weight": "mlp_norm.scale",
        "ln_2.bias": "mlp_norm.bias",
        "attn.c_proj.weight": ("attn.out.kernel", CONV_OUT),
        "attn.c_proj.bias": "attn.out.bias",
        "mlp.c_fc.weight": "mlp.up.kernel",
        "mlp.c_fc.bias": "mlp.up.bias",
        "mlp.c_proj.weight": "mlp.down.kernel",
        "mlp.c_proj.bias": "mlp.down.bias",
    },
)


# Mixture of experts: the attention as Llama's (Qwen3-MoE with q/k norms, Qwen2-MoE with q/k/v biases),
# the router, and one tensor per expert ({e}) that fills slice e of our [experts, in, out] kernels.
_ATTENTION = {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")}
MIXTRAL = _LLAMA_TOP + _layer(
    "model.layers.{i}.",
    {
        **_ATTENTION,
        "block_sparse_moe.gate.weight": ("mlp.router.kernel", LINEAR),
        "block_sparse_moe.experts.{e}.w1.weight": ("mlp.gate.kernel", LINEAR),
        "block_sparse_moe.experts.{e}.w3.weight": ("mlp.up.kernel", LINEAR),
        "block_sparse_moe.experts.{e}.w2.weight": ("mlp.down.kernel", LINEAR),
    },
)
# Qwen's dense layers (mlp_only_layers, decoder_sparse_step) keep Llama's MLP names.
_DENSE_MLP = {k: v for k, v in _LLAMA_LAYER.items() if k.startswith("mlp.") and k.endswith(".weight")}
QWEN_MOE = (
    _LLAMA_TOP
    + tuple(r._replace(dense_only=True) for r in _layer("model.layers.{i}.", _DENSE_MLP))
    + _layer(
        "model.layers.{i}.",
        {
            **_ATTENTION,
            "mlp.gate.weight": ("mlp.router.kernel", LINEAR),
            "mlp.experts.{e}.gate_proj.weight": ("mlp.gate.kernel", LINEAR),
            "mlp.experts.{e}.up_proj.weight": ("mlp.up.kernel", LINEAR),
            "mlp.experts.{e}.down_proj.weight": ("mlp.down.kernel", LINEAR),
            "mlp.shared_expert.gate_proj.weight": ("mlp.shared.gate.kernel", LINEAR),  # Qwen2-MoE
            "mlp.shared_expert.up_proj.weight": ("mlp.shared.up.kernel", LINEAR),
            "mlp.shared_expert.down_proj.weight": ("mlp.shared.down.kernel", LINEAR),
            "mlp.shared_expert_gate.weight": ("mlp.shared_gate.kernel", LINEAR),
        },
    )
)


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str
    rules: tuple[Rule, ...]
    activation: str  # hidden_act in config.json
    tied_by_default: bool = False


FAMILIES = {
    "llama": Family("LlamaForCausalLM", LLAMA, "silu"),
    "mistral": Family("MistralForCausalLM", LLAMA, "silu"),
    "qwen2": Family("Qwen2ForCausalLM", LLAMA, "silu"),
    "qwen3": Family("Qwen3ForCausalLM", LLAMA, "silu"),
    "gemma": Family("GemmaForCausalLM", LLAMA, "gelu_pytorch_tanh", tied_by_default=True),
    "gemma2": Family("Gemma2ForCausalLM", GEMMA2, "gelu_pytorch_tanh", tied_by_default=True),
    "gpt2": Family("GPT2LMHeadModel", GPT2, "gelu_new", tied_by_default=True),
    "mixtral": Family("MixtralForCausalLM", MIXTRAL, "silu"),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", QWEN_MOE, "silu"),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", QWEN_MOE, "silu"),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
# Tensors some checkpoints carry that are not parameters (buffers saved by older transformers).
_BUFFERS = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
_DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------------
# config.json


def config_from_hf(folder, **overrides) -> ModelConfig:
    """The ModelConfig that config.json describes (transformers 5.x `rope_parameters` or 4.x
    `rope_theta`/`rope_scaling`); overrides set execution options such as scan_layers or dtype."""
    path = pathlib.Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise UserError(
            f"{folder} is not a Hugging Face model folder (no config.json); pass the folder that holds "
            "config.json and the *.safetensors files"
        )
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    try:
        cfg = _from_hf(hf, path)
    except KeyError as e:
        raise UserError(f"{path} lacks {e.args[0]!r}, which its model_type needs; is the file complete?") from None
    return dataclasses.replace(cfg, **overrides)


def _from_hf(hf: dict, where) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{where}: model_type={model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise UserError(f"{where}: dtype={dtype!r} is not supported; supported: {', '.join(_DTYPES)}")
    common = dict(
        vocab_size=hf["vocab_size"],
        tie_embeddings=hf.get("tie_word_embeddings", family.tied_by_default),
        param_dtype=dtype,
    )
    if model_type == "gpt2":
        _expect(hf, where, activation_function=("gelu_new", "gelu_pytorch_tanh"), scale_attn_weights=(True, None))
        _expect(hf, where, scale_attn_by_inverse_layer_idx=(False, None))
        return ModelConfig(
            **common,
            d_model=hf["n_embd"],
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            n_kv_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
            max_seq_len=hf["n_positions"],
            norm="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="gelu",
            positions="learned",
            qkv_bias=True,
            mlp_bias=True,
            attn_out_bias=True,
        )
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or family.activation
    if model_type == "gemma" and activation == "gelu":
        activation = "gelu_pytorch_tanh"  # legacy Gemma configs; transformers makes the same substitution
    if activation != family.activation:
        raise UserError(
            f"{where}: hidden_act={activation!r} is not supported for {model_type}; expected {family.activation!r}"
        )
    gemma = model_type in ("gemma", "gemma2")
    attention_bias = hf.get("attention_bias", False)
    qkv_bias = {"qwen2": True, "qwen2_moe": hf.get("qkv_bias", True)}.get(model_type, attention_bias)
    n_layers = hf["num_hidden_layers"]
    window, first, every = _sliding(hf, model_type, n_layers, where)
    rope = _rope(hf, where)
    return ModelConfig(
        **common,
        **rope,
        d_model=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=_context(hf, rope),
        head_dim=_head_dim(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm="rms_plus_one" if gemma else "rms",
        mlp="geglu" if gemma else "swiglu",
        scale_embeddings=gemma,
        qkv_bias=qkv_bias,
        attn_out_bias=False if model_type in ("qwen2", "qwen2_moe") else attention_bias,
        mlp_bias=hf.get("mlp_bias", False) if model_type == "llama" else False,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        post_norms=model_type == "gemma2",
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if model_type == "gemma2" else None,
        attn_softcap=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
        final_softcap=hf.get("final_logit_softcapping") if model_type == "gemma2" else None,
        sliding_window=window,
        sliding_window_first=first,
        sliding_window_every=every,
        **_experts(hf, model_type, where),
    )


def _experts(hf: dict, model_type: str, where) -> dict:
    """The mixture-of-experts options of a Mixtral, Qwen2-MoE or Qwen3-MoE config.json."""
    if model_type not in MOE_FAMILIES:
        return {}
    qwen = model_type != "mixtral"
    if not qwen and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1):
        raise UserError(
            f"{where}: mlp_only_layers={hf.get('mlp_only_layers')} and decoder_sparse_step="
            f"{hf.get('decoder_sparse_step')} are not Mixtral options; every Mixtral layer has experts"
        )
    out = dict(
        n_experts=hf.get("num_local_experts") or hf["num_experts"],
        experts_per_token=hf["num_experts_per_tok"],
        moe_d_ff=hf["moe_intermediate_size"] if qwen else hf["intermediate_size"],
        router_norm_topk=hf.get("norm_topk_prob", False) if qwen else True,
        router_aux_loss=hf.get("router_aux_loss_coef", 0.001) if hf.get("output_router_logits") else 0.0,
    )
    if qwen:  # which layers have experts, as transformers decides it
        dense = tuple(hf.get("mlp_only_layers") or ())
        out.update(moe_layer_step=hf.get("decoder_sparse_step") or 1, dense_layers=dense)
    if model_type == "qwen2_moe":
        out.update(n_shared_experts=1, shared_expert_d_ff=hf["shared_expert_intermediate_size"])
    return out


def _head_dim(hf: dict) -> int | None:
    """None where head_dim is the default hidden_size // heads (our config leaves it unset then)."""
    head_dim = hf.get("head_dim")
    return None if head_dim in (None, hf["hidden_size"] // hf["num_attention_heads"]) else head_dim


def _expect(hf, where, **allowed):
    for key, values in allowed.items():
        if hf.get(key) not in values:
            raise UserError(f"{where}: {key}={hf.get(key)!r} is not supported; supported: {values[0]!r}")


def _rope(hf: dict, where) -> dict:
    params = hf.get("rope_parameters")
    if params is None:  # transformers 4.x
        params = {"rope_theta": hf.get("rope_theta", 10_000.0), **(hf.get("rope_scaling") or {})}
    if not isinstance(params, dict) or "rope_theta" not in params and any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"{where}: per-layer rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise UserError(f"{where}: rope_type={rope_type!r} is not supported; supported: default, linear, llama3, yarn")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        factor = params["partial_rotary_factor"]
        raise UserError(f"{where}: partial_rotary_factor={factor} is not supported; supported: 1.0")
    out = dict(rope_type=rope_type, rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10_000.0))))
    if rope_type == "yarn":
        return out | _yarn(params, hf)
    if rope_type != "default":
        out["rope_scaling"] = float(params["factor"])
    if rope_type == "llama3":
        out.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(params["original_max_position_embeddings"]),
        )
    return out


def _context(hf: dict, rope: dict) -> int:
    """max_position_embeddings, or the context YaRN stretches to (original x factor) where that is longer:
    Qwen2.5's long-context setting adds rope_scaling to a config.json that still says 32,768."""
    context = hf.get("max_position_embeddings", 2048)
    if rope["rope_type"] == "yarn":
        context = max(context, int(rope["rope_original_max_len"] * rope["rope_scaling"]))
    return context


def _yarn(params: dict, hf: dict) -> dict:
    """YaRN's keys, with transformers' defaults (_compute_yarn_parameters) made explicit."""
    old_len = int(params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048))
    factor = params.get("factor") or hf.get("max_position_embeddings", old_len) / old_len  # DeepSeek leaves it out
    attention_factor, mscale, mscale_all_dim = (params.get(k) for k in ("attention_factor", "mscale", "mscale_all_dim"))
    if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's form
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return dict(
        rope_scaling=float(factor),
        rope_original_max_len=old_len,
        rope_beta_fast=float(params.get("beta_fast") or 32.0),
        rope_beta_slow=float(params.get("beta_slow") or 1.0),
        rope_attention_factor=None if attention_factor is None else float(attention_factor),
        rope_truncate=bool(params.get("truncate", True)),
    )


def _sliding(hf: dict, model_type: str, n_layers: int, where) -> tuple[int | None, int, int]:
    """(window, first sliding layer, stride between sliding layers) from sliding_window and layer_types."""
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None
    if window is None or model_type in ("llama", "gemma"):
        return None, 0, 1
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", 0) if model_type.startswith("qwen") else 0
        types = [
            "sliding_attention" if i >= first and (model_type != "gemma2" or i % 2 == 0) else "full_attention"
            for i in range(n_layers)
        ]
    sliding = [t == "sliding_attention" for t in types]
    if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise UserError(f"{where}: layer_types={types} is not supported; expected one entry per layer, sliding or full")
    if not any(sliding):
        return None, 0, 1
    first = sliding.index(True)
    for every in range(1, n_layers + 1):
        if sliding == [i >= first and (i - first) % every == 0 for i in range(n_layers)]:
            return int(window), first, every
    raise UserError(f"{where}: layer_types={types} is not supported; sliding layers must be evenly spaced")


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face model_type an export of cfg gets (checked by re-reading the config)."""
    if cfg.n_experts:
        return "qwen2_moe" if cfg.shared_d_ff else "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.positions == "learned":
        return "gpt2"
    if cfg.post_norms:
        return "gemma2"
    if cfg.norm == "rms_plus_one":
        return "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.attn_out_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        return "mistral"
    return "llama"


def config_to_hf(cfg: ModelConfig, extra: dict | None = None) -> dict:
    """config.json for cfg. A model option the family's config cannot state is an error."""
    model_type = family_of(cfg)
    family = FAMILIES[model_type]
    out = {"architectures": [family.architecture], "model_type": model_type, "vocab_size": cfg.vocab_size}
    if model_type == "gpt2":
        out.update(
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new",
            scale_attn_weights=True,
        )
    else:
        rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
        if cfg.rope_type == "default" and cfg.rope_scaling != 1.0:
            rope["rope_type"] = "linear"
        if rope["rope_type"] != "default":
            rope["factor"] = cfg.rope_scaling
        if cfg.rope_type == "llama3":
            rope.update(
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len,
            )
        if cfg.rope_type == "yarn":
            rope.update(
                original_max_position_embeddings=cfg.rope_original_max_len,
                beta_fast=cfg.rope_beta_fast,
                beta_slow=cfg.rope_beta_slow,
                truncate=cfg.rope_truncate,
            )
            if cfg.rope_attention_factor is not None:
                rope["attention_factor"] = cfg.rope_attention_factor
        out.update(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.dim_per_head,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters=rope,
            **{"hidden_activation" if model_type == "gemma2" else "hidden_act": family.activation},
        )
        if model_type == "qwen2_moe":
            out["qkv_bias"] = cfg.qkv_bias
        elif model_type != "qwen2":
            out["attention_bias"] = cfg.qkv_bias
        if model_type == "llama":
            out["mlp_bias"] = cfg.mlp_bias
        if model_type in ("mistral", "mixtral", "qwen2", "qwen3", "gemma2"):
            out["sliding_window"] = cfg.sliding_window
        if model_type in MOE_FAMILIES:
            out.update(_experts_to_hf(cfg, model_type))
        if model_type in ("qwen2", "qwen3", "gemma2"):
            sliding = cfg.sliding_layers
            out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
            if model_type != "gemma2":
                out["use_sliding_window"] = any(sliding)
                out["max_window_layers"] = sliding.index(True) if any(sliding) else cfg.n_layers
        if model_type == "gemma2":
            out.update(
                query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.dim_per_head),  # an int in HF
                attn_logit_softcapping=cfg.attn_softcap,
                final_logit_softcapping=cfg.final_softcap,
            )
    out.update(tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype, use_cache=True, **(extra or {}))
    # Exact by construction: the config we write must read back as the model we have.
    want, back = _canonical(cfg), _canonical(_from_hf(out, "export"))
    differ = [
        f"{f.name}={getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if getattr(want, f.name) != getattr(back, f.name)
    ]
    if differ:
        raise UserError(f"the model cannot be written as a Hugging Face {model_type} checkpoint: {', '.join(differ)}")
    return out


def _experts_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(
        num_experts_per_tok=cfg.experts_per_token,
        router_aux_loss_coef=cfg.router_aux_loss or 0.001,
        output_router_logits=cfg.router_aux_loss > 0,
    )
    if model_type == "mixtral":
        return dict(out, num_local_experts=cfg.n_experts, intermediate_size=cfg.expert_d_ff)
    out.update(
        num_experts=cfg.n_experts,
        moe_intermediate_size=cfg.expert_d_ff,
        norm_topk_prob=cfg.router_norm_topk,
        decoder_sparse_step=cfg.moe_layer_step,
        mlp_only_layers=list(cfg.dense_layers),
        use_sliding_window=False,
    )
    if model_type == "qwen2_moe":
        out["shared_expert_intermediate_size"] = cfg.shared_d_ff
    return out


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _canonical(cfg: ModelConfig) -> ModelConfig:
    """cfg with the fields that do not change the numbers reset, and equivalent spellings made one."""
    defaults = ModelConfig()
    cfg = dataclasses.replace(
        cfg, head_dim=cfg.dim_per_head, **{k: getattr(defaults, k) for k in (*EXECUTION, "init_std")}
    )
    if cfg.query_pre_attn_scalar is None:  # the default scale is head_dim ** -0.5
        cfg = dataclasses.replace(cfg, query_pre_attn_scalar=float(cfg.dim_per_head))
    if cfg.rope_type == "default":  # default is linear scaling by rope_scaling (1: none)
        cfg = dataclasses.replace(cfg, rope_type="linear")
    rope = ("rope_theta", "rope_scaling", "rope_type") if cfg.positions == "learned" else ()
    if cfg.rope_type != "llama3":
        rope += ("rope_low_freq_factor", "rope_high_freq_factor")
    if cfg.rope_type not in ("llama3", "yarn"):
        rope += ("rope_original_max_len",)
    if cfg.rope_type != "yarn":
        rope += ("rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_truncate")
    cfg = dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in rope})
    if not any(cfg.sliding_layers):
        cfg = dataclasses.replace(cfg, sliding_window=None, sliding_window_first=0, sliding_window_every=1)
    # Training options of the router; the layers with experts named one way (a dense layer named by
    # both moe_layer_step and dense_layers, once); with experts in every layer, d_ff is never used.
    training = ("router_aux_loss", "router_z_loss", "capacity_factor")
    cfg = dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in training})
    if cfg.n_experts:
        dense = tuple(sorted({i for i in cfg.dense_layers if (i + 1) % cfg.moe_layer_step == 0}))
        cfg = dataclasses.replace(
            cfg, moe_d_ff=cfg.expert_d_ff, n_shared_experts=min(cfg.n_shared_experts, 1),
            shared_expert_d_ff=cfg.shared_d_ff or None, dense_layers=dense,
        )  # fmt: skip
    if cfg.n_experts and all(cfg.moe_layers):
        cfg = dataclasses.replace(cfg, d_ff=cfg.expert_d_ff, moe_layer_step=1)
    return cfg


# ------------------------------------------------------------------------------------------------
# Tensors


class _Tensor(NamedTuple):
    """One Hugging Face tensor of the model and where it goes: slice `index` (its layer on a stack,
    its expert) of each of our parameters `targets`."""

    name: str
    rule: Rule
    targets: list[tuple]
    index: tuple[int, ...]


def _tensors(cfg: ModelConfig, params: dict) -> list[_Tensor]:
    """Every Hugging Face tensor of the model, from the family's rules and the layers' places
    (lm.model.layer_paths). Every element of every parameter is covered exactly once."""
    out = []
    for rule in FAMILIES[family_of(cfg)].rules:
        paths = [tuple(p.split(".")) for p in rule.ours]
        experts = "{e}" in rule.hf
        places = enumerate(layer_paths(cfg)) if "{i}" in rule.hf else [(None, ((), None))]
        for layer, (prefix, stacked) in places:
            sparse = layer is not None and cfg.moe_layers[layer]
            if experts and not sparse or rule.dense_only and sparse:
                continue
            targets = [prefix + p for p in paths]
            present = [t in params for t in targets]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"rule {rule.hf} covers only part of {targets}")
            lead = () if stacked is None else (stacked,)
            for e in range(cfg.n_experts) if experts else [None]:
                index = lead + (() if e is None else (e,))
                out.append(_Tensor(rule.hf.format(i=layer, e=e), rule, targets, index))
    covered: dict[tuple, list] = {}
    for t in out:
        for target in t.targets:
            covered.setdefault(target, []).append(t.index)
    # Covered once each: as many distinct slices as the parameter's leading (layer, expert) axes hold.
    once = {p for p, idx in covered.items() if len(set(idx)) == len(idx) == math.prod(params[p].shape[: len(idx[0])])}
    wrong = (set(params) ^ set(covered)) | (set(covered) - once)
    if wrong:
        raise ValueError(f"mapping table mismatch: {sorted(map(str, wrong))}")
    return out


class _Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read one at a time."""

    def __init__(self, folder: pathlib.Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
            for file in sorted(set(weight_map.values())):
                if not (folder / file).is_file():
                    raise UserError(f"{folder} lacks shard {file}, which {index.name} lists; download it again")
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(folder / "model.safetensors", framework="numpy") as f:
                    self.files = dict.fromkeys(f.keys(), folder / "model.safetensors")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{folder / 'model.safetensors'} is not a readable safetensors file ({e})") from None
        else:
            raise UserError(f"{folder} holds no model.safetensors or model.safetensors.index.json")

    def read(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        # Opened per tensor: the file is memory-mapped, and closing it returns the pages read.
        try:
            with safe_open(self.files[name], framework="numpy") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read tensor {name} from {self.files[name]}: {e}") from None


def _fit(hf: np.ndarray, rule: Rule, want: list, cfg: ModelConfig, what: str) -> tuple[np.ndarray, ...]:
    """Our arrays from one HF tensor, or a UserError when its shape does not fit the model."""
    try:
        ours = rule.transform.load(hf, cfg)
    except ValueError:  # a reshape that cannot work
        ours = None
    if ours is None or [x.shape for x in ours] != [tuple(w) for w in want]:
        raise UserError(
            f"{what} has shape {list(hf.shape)}, which does not fit the model config.json describes "
            f"({', '.join(str(list(w)) for w in want)}); the checkpoint and config disagree"
        )
    return ours


@functools.partial(jax.jit, donate_argnums=0)
def _set_at(stack, value, index):
    """Write one layer (and expert) into a stacked parameter in place (the stack is donated)."""
    start = (*index, *(0,) * value.ndim)
    return jax.lax.dynamic_update_slice(stack, value.reshape((1,) * len(index) + value.shape), start)


def load_hf(
    folder,
    *,
    scan_layers: bool = True,
    dtype: str | None = None,
    param_dtype: str | None = None,
    layout: Layout | None = None,
) -> Transformer:
    """The model in a Hugging Face folder, its parameters placed on their final shardings.

    dtype: compute dtype (default 'auto'); param_dtype: default the checkpoint's (config.json dtype).
    layout: where to place the parameters (default: one device).
    """
    folder = pathlib.Path(folder).expanduser()
    overrides = dict(scan_layers=scan_layers)
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cfg = config_from_hf(folder, **overrides)
    checkpoint = _Checkpoint(folder)
    layout = layout or Layout.build(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    check_divisible(cfg.logical_dims(), layout)  # an indivisible dimension would be silently replicated
    mesh = layout.mesh
    with layout:
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        shardings = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.get_named_sharding(state, mesh))}
        params = {path: var for path, var in nnx.to_flat_state(state)}
        values: dict[tuple, jax.Array] = {}
        used = set()
        for name, rule, targets, index in _tensors(cfg, params):
            if name not in checkpoint.files:
                raise UserError(f"{folder}: tensor {name} is missing; the checkpoint does not match config.json")
            used.add(name)
            want = [params[t].shape[len(index) :] for t in targets]
            for target, x in zip(targets, _fit(checkpoint.read(name), rule, want, cfg, f"{folder}: tensor {name}")):
                var, sharding = params[target], shardings[target]
                x = np.asarray(x, dtype=var.dtype)
                if not index:
                    values[target] = jax.device_put(x, sharding)
                    continue
                if target not in values:  # allocated on the devices, then filled layer by layer, expert by expert
                    values[target] = jax.jit(lambda v=var: jnp.zeros(v.shape, v.dtype), out_shardings=sharding)()
                part_sharding = NamedSharding(mesh, P(*sharding.spec[len(index) :]))
                values[target] = _set_at(values[target], jax.device_put(x, part_sharding), index)
        leftover = set(checkpoint.files) - used
        leftover = {n for n in leftover if not n.endswith(_BUFFERS)}
        if cfg.tie_embeddings:
            leftover.discard("lm_head.weight")  # some checkpoints store the tied copy too
        if leftover:
            raise UserError(
                f"{folder}: {len(leftover)} tensors do not belong to the {family_of(cfg)} model config.json "
                f"describes, e.g. {sorted(leftover)[:3]}"
            )
        for path, var in params.items():
            var.set_value(jax.device_put(values[path], shardings[path]))
        return nnx.merge(graphdef, state)


def hf_tensors(model: Transformer):
    """(name, numpy array) for each Hugging Face tensor of the model, gathered one at a time (across
    processes too: then every process must iterate, and each holds one whole tensor beyond its shards)."""
    cfg = model.cfg
    params = {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for name, rule, targets, index in _tensors(cfg, params):
        ours = tuple(to_host(params[t].get_value()[index]) for t in targets)
        yield name, np.ascontiguousarray(rule.transform.save(ours, cfg))


def save_hf(
    model: Transformer,
    out_dir,
    *,
    max_shard_bytes: int = 5 * 2**30,
    extra_config: dict | None = None,
    write: bool = True,
) -> None:
    """Write model-*.safetensors (+ model.safetensors.index.json beyond one shard), config.json and
    generation_config.json, as transformers' save_pretrained lays them out.

    Each file is written under a temporary name and renamed into place; weights an earlier export left
    in the folder are removed only after the new ones are complete. extra_config: more config.json
    keys, e.g. bos_token_id/eos_token_id (also written to generation_config.json). write=False (the
    other processes of a multi-process export): gather every tensor with process 0, write nothing.
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir).expanduser()
    if write:
        out.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.cfg, extra_config)
    shards, current, size = [], {}, 0
    for name, tensor in hf_tensors(model):
        if not write:
            continue
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
        if size >= max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if not write:
        return
    if current or not shards:
        shards.append(current)
    weight_map, total, files = {}, 0, {}
    try:
        for k, shard in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            files[file] = None
            save_file(shard, out / f".{file}.partial", metadata={"format": "pt"})
            for name, tensor in shard.items():
                weight_map[name] = file
                total += tensor.nbytes
            shards[k] = None  # free each shard once written
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            files["model.safetensors.index.json"] = json.dumps(index, indent=2) + "\n"
        files["config.json"] = json.dumps(config, indent=2) + "\n"
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = {k: config[k] for k in keys if config.get(k) is not None}
        files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
        for file, text in files.items():
            if text is not None:
                (out / f".{file}.partial").write_text(text)
    except BaseException:
        for file in files:
            (out / f".{file}.partial").unlink(missing_ok=True)
        raise
    # Only now, with every new file complete, the old weights go (model.safetensors or model-*-of-*
    # shards and their index; never model_ema.safetensors or other files), and the new ones take their place.
    old = [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors", out / "model.safetensors.index.json"]
    for stale in old:
        if stale.name not in files:
            stale.unlink(missing_ok=True)
    for file in files:
        (out / f".{file}.partial").replace(out / file)


def checkpoint_bytes(folder) -> int:
    """Total size of a folder's safetensors files."""
    return sum(p.stat().st_size for p in pathlib.Path(folder).glob("*.safetensors"))
