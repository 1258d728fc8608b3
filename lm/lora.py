"""LoRA and QLoRA: low-rank adapters on a frozen (optionally 4/8-bit) base, by model surgery.

Each targeted projection (an `nnx.Linear` or the attention's 3-D `nnx.LinearGeneral`) is replaced by
`LoRA(base)`, which computes `base(x) + (alpha / rank) * (x A) B` with A `[in..., rank]` and B
`[rank, out...]` as `nnx.LoRAParam`s. Only those are trained (`TRAINABLE`); every other parameter
is frozen and carries no gradient and no optimizer state.

Why not `qwix.apply_lora_to_model`: qwix creates the adapters by running the model once and
intercepting each `dot_general`. Inside our `nnx.scan` over the stacked layers that creation
fails (`IndexError` from `jax.lax.scan`: new variables cannot appear inside a scan body), and the
unscanned path flattens the head axes (B `[rank, heads*head_dim]`, named by its first axis only).
Here the adapters are created outside any transform with the stacked layer axis already in place
(A `[layers, embed, rank]`, B `[layers, rank, heads, head_dim]`), named after their base kernel's
logical axes, so `nnx.scan` slices them per layer and FSDP/TP shard them like the base. qwix still
does the quantisation: `lora.base_dtype=nf4|int8` stores each targeted kernel as a qwix `QArray`
(nf4 in blocks of 64 along the input axis, as QLoRA does) and dequantises it inside the matmul.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from qwix._src.core import qarray

from lm.errors import UserError
from lm.recipe import LoraConfig

TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
DEFAULT_TARGETS = LoraConfig.targets  # attention and MLP projections
BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
QUANT_BLOCK = 64  # QLoRA's nf4 block size along the input axis


class Quantized(nnx.Variable):
    """A frozen, quantised base weight (qwix QArray parts): never a Param, so never trained or decayed."""


class DropoutSalt(nnx.Variable):
    """A per-layer constant folded into the step's dropout key, so each layer draws its own mask."""


# The dropout key of the current training step (lm.train.step sets it); None: no dropout (eval, decode).
_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key):
    """Within this block, adapters with dropout > 0 drop their inputs using `key` (read at trace time)."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What `apply` needs; lm.recipe.LoraConfig validates the user-facing keys."""

    rank: int
    alpha: float
    targets: str = DEFAULT_TARGETS
    base_dtype: str = "bfloat16"
    dropout: float = 0.0  # on the adapter's input, in training only (as PEFT's lora_dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _n_in(base: nnx.Module) -> int:
    """How many leading kernel axes (after a stacked layer axis) the projection contracts."""
    if isinstance(base, nnx.LinearGeneral):
        axis = base.axis if isinstance(base.axis, tuple) else (base.axis,)
        return len(axis)
    return 1


def _n_out(base: nnx.Module) -> int:
    if isinstance(base, nnx.LinearGeneral):
        return len(base.out_features) if isinstance(base.out_features, tuple) else 1
    return 1


class LoRA(nnx.Module):
    """One adapted projection: base(x) + scale * (x A) B.

    Kernel layout [layers?, in..., out...]: Linear [in, out], q/k/v [embed, heads, head_dim],
    out [heads, head_dim, embed]. A is [layers?, in..., rank], B [layers?, rank, out...].
    """

    def __init__(self, base: nnx.Linear | nnx.LinearGeneral, spec: LoraSpec, key: jax.Array):
        kernel = base.kernel
        self.n_in, n_out = _n_in(base), _n_out(base)
        lead = kernel.ndim - self.n_in - n_out  # 1 for a stack built by nnx.vmap, else 0
        names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        shape = kernel.shape
        in_shape, out_shape = shape[lead : lead + self.n_in], shape[lead + self.n_in :]
        # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0,
        # so a fresh adapter leaves the model's outputs exactly as they were.
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(key, shape[: lead + self.n_in] + (spec.rank,), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, out_sharding=tuple(names[: lead + self.n_in]) + (None,))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros(shape[:lead] + (spec.rank,) + out_shape, jnp.float32),
            out_sharding=tuple(names[:lead]) + (None,) + tuple(names[lead + self.n_in :]),
        )
        self.scale = spec.scale
        self.dropout = spec.dropout
        # [layers?, 1]: nnx.scan drops a 1-D variable's 'layers' name when run eagerly (flax 0.12.8).
        salt = jax.random.randint(jax.random.fold_in(key, 1), shape[:lead] + (1,), 0, 2**31 - 1, jnp.int32)
        self.salt = DropoutSalt(salt, out_sharding=tuple(names[:lead]) + (None,))
        self.qtype = None
        self.base = base
        if spec.base_dtype in ("int8", "nf4"):
            self.qtype = spec.base_dtype
            q = _quantize(kernel[...], lead, self.n_in, spec.base_dtype)
            self.qvalue = Quantized(q.qvalue, out_sharding=names)
            # The blocked axis of the scales is shorter than the kernel's: left unsharded.
            scale_names = tuple(None if s != k else n for s, k, n in zip(q.scale.shape, shape, names))
            self.qscale = Quantized(q.scale, out_sharding=scale_names)
            base.kernel = nnx.data(None)  # the quantised copy replaces it

    def kernel(self) -> jax.Array:
        """The base kernel, dequantised when stored quantised."""
        if self.qtype is None:
            return self.base.kernel[...]
        q = qarray.QArray(self.qvalue[...], self.qscale[...], None, jnp.int8 if self.qtype == "int8" else "nf4")
        return qarray.dequantize(q)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, length, in...] -> [batch, length, out...]."""
        if self.qtype is None:
            y = self.base(x)
        else:
            y = _project(x, self.kernel(), self.base, self.n_in)
        contract = tuple(range(x.ndim - self.n_in, x.ndim))
        key = _DROPOUT_KEY.get()
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt[...][0]), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a, b = self.lora_a[...].astype(y.dtype), self.lora_b[...].astype(y.dtype)
        xa = jax.lax.dot_general(x.astype(y.dtype), a, ((contract, tuple(range(self.n_in))), ((), ())))
        delta = jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))
        return y + (self.scale * delta).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """base + scale * A B, in float32 (the caller casts to the base's dtype)."""
        kernel = self.kernel().astype(jnp.float32)
        a, b = self.lora_a[...], self.lora_b[...]
        lead = a.ndim - self.n_in - 1
        a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
        b2 = b.reshape(b.shape[: lead + 1] + (-1,))
        delta = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
        return kernel + self.scale * delta.reshape(kernel.shape)


def _project(x, kernel, base, n_in: int):
    """What `base(x)` computes, with `kernel` in place of the module's own (same dot_general)."""
    bias = base.bias[...] if base.bias is not None else None
    x, kernel, bias = base.promote_dtype((x, kernel, bias), dtype=base.dtype)
    contract = tuple(range(x.ndim - n_in, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())), precision=base.precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
    return y


def _quantize(kernel: jax.Array, lead: int, n_in: int, qtype: str) -> qarray.QArray:
    """Per output channel (and per layer), in blocks of QUANT_BLOCK along the last input axis.

    A stacked kernel is quantised one layer at a time (lax.map), so the float32 working copy is one
    layer's, not the stack's: for Llama 3.1 8B's MLP that is 235 MB instead of 7.5 GB."""
    axis = n_in - 1  # within one layer
    size = kernel.shape[lead + axis]
    tile = QUANT_BLOCK if size % QUANT_BLOCK == 0 else size
    channelwise = tuple(i for i in range(kernel.ndim - lead) if i != axis)

    def one(k):
        return qarray.quantize_api(
            k.astype(jnp.float32),
            jnp.int8 if qtype == "int8" else "nf4",
            channelwise_axes=channelwise,
            tiled_axes={axis: tile},
            scale_dtype=jnp.bfloat16 if qtype == "nf4" else jnp.float32,
        )

    return jax.jit(lambda k: jax.lax.map(one, k) if lead else one(k))(kernel)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def targets(model: nnx.Module, pattern: str) -> list[tuple[tuple, nnx.Module]]:
    """(path, module) of every Linear/LinearGeneral whose dotted path fully matches `pattern`."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UserError(f"lora.targets={pattern!r} is not a valid regular expression ({e})") from None
    found = [
        (path, module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, (nnx.Linear, nnx.LinearGeneral)) and regex.fullmatch(_dotted(path))
    ]
    if not found:
        names = [_dotted(p) for p, m in nnx.iter_modules(model) if isinstance(m, (nnx.Linear, nnx.LinearGeneral))]
        raise UserError(f"lora.targets={pattern!r} matches no projection; module paths look like {names[:6]}")
    return found


def _parent(model, path):
    node = model
    for name in path[:-1]:
        node = node[name] if isinstance(name, int) else getattr(node, name)
    return node


def _set(parent, name, value):
    if isinstance(name, int):
        parent[name] = value
    else:
        setattr(parent, name, value)


def apply(model: nnx.Module, spec: LoraSpec, seed: int = 0) -> list[str]:
    """Adapt the projections matching spec.targets in place; return their paths.

    The frozen base is cast to spec.base_dtype (bfloat16, or float32 for exact tests); with int8 or
    nf4 the adapted kernels are quantised and everything else frozen is kept in bfloat16.
    """
    if spec.base_dtype not in BASE_DTYPES:
        raise UserError(f"lora.base_dtype={spec.base_dtype!r} is not one of {list(BASE_DTYPES)}")
    found = targets(model, spec.targets)
    keys = jax.random.split(jax.random.key(seed), len(found))
    for (path, module), key in zip(found, keys):
        _set(_parent(model, path), path[-1], LoRA(module, spec, key))
    store = jnp.float32 if spec.base_dtype == "float32" else jnp.bfloat16
    frozen = nnx.state(model, FROZEN)
    nnx.update(model, jax.tree.map(lambda x: x.astype(store), frozen))
    return [_dotted(p) for p, _ in found]


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel (in the base's param dtype) and put the plain
    projection back, in place: the result is an ordinary Transformer (export, fast decode)."""
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, LoRA):
            base = module.base
            dtype = base.kernel.dtype if module.qtype is None else jnp.bfloat16
            names = module.qvalue.get_metadata().get("out_sharding") if module.qtype else None
            merged = module.merged_kernel().astype(dtype)
            if module.qtype is None:
                base.kernel[...] = merged
            else:
                base.kernel = nnx.Param(merged, out_sharding=names)
            _set(_parent(model, path), path[-1], base)
    return model


def adapters(model: nnx.Module) -> dict[str, LoRA]:
    """Dotted path -> LoRA module, in model order."""
    return {_dotted(p): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRA)}


def count(model: nnx.Module) -> tuple[int, int]:
    """(trainable adapter parameters, frozen parameters incl. quantised ones)."""
    n = lambda state: sum(x.size for x in jax.tree.leaves(state))  # noqa: E731
    return n(nnx.state(model, TRAINABLE)), n(nnx.state(model, nnx.Any(FROZEN, Quantized)))


# ------------------------------------------------------------------------------------------------
# PEFT export: the adapter as `peft` saves it, named after the Hugging Face modules (lm.hf's table)


def peft_adapter(model: nnx.Module, spec: LoraSpec) -> tuple[dict, dict]:
    """(tensors, adapter_config) in PEFT's LoRA format.

    PEFT computes W x + (alpha / r) B_hf A_hf x with A_hf [r, in] and B_hf [out, r] on the HF weight
    W [out, in]. Our kernels are W^T with the in and out axes possibly split into heads ([d_model,
    heads, head_dim], [heads, head_dim, d_model]); lm.hf's mapping table flattens them in C order,
    which is checked here for each projection, so A_hf = A.reshape(in, r).T, B_hf = B.reshape(r, out).T.
    """
    import numpy as np

    from lm.hf import FAMILIES, family_of

    cfg = model.cfg
    family = family_of(cfg)
    if family == "gpt2":
        raise UserError("--adapter-only does not support GPT-2 (fused c_attn Conv1D); export the merged model instead")
    rules = {r.ours[0]: r for r in FAMILIES[family].rules if "{i}" in r.hf and len(r.ours) == 1}
    tensors, modules = {}, set()
    rng = np.random.default_rng(0)
    for path, module in adapters(model).items():
        parts = path.split(".")
        stacked = cfg.scan_layers
        sub = ".".join(parts[1:] if stacked else parts[2:])
        rule = rules.get(sub + ".kernel")
        if parts[0] != "blocks" or rule is None:
            raise UserError(f"adapter on {path} has no Hugging Face module to export to; adapt only block projections")
        a, b = np.asarray(jax.device_get(module.lora_a[...])), np.asarray(jax.device_get(module.lora_b[...]))
        layers = range(cfg.n_layers) if stacked else [int(parts[1])]
        in_shape = a.shape[(1 if stacked else 0) : -1]
        out_shape = b.shape[(2 if stacked else 1) :]
        probe = rng.standard_normal(in_shape + out_shape).astype(np.float32)
        if not np.array_equal(rule.transform.save((probe,), cfg), probe.reshape(math.prod(in_shape), -1).T):
            raise UserError(f"the Hugging Face layout of {rule.hf} is not a plain transpose; cannot export its adapter")
        name = rule.hf[: -len(".weight")]
        modules.add(name.rsplit(".", 1)[-1])
        for i in layers:
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            prefix = f"base_model.model.{name.format(i=i)}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, spec.rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(bi.reshape(spec.rank, -1).T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return tensors, config


def save_peft(model: nnx.Module, spec: LoraSpec, out_dir, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors and adapter_config.json (what peft's save_pretrained writes)."""
    import json
    import pathlib

    from safetensors.numpy import save_file

    tensors, config = peft_adapter(model, spec)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config["base_model_name_or_path"] = base_model_name_or_path
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
