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

The experts of an MoE layer (`ExpertLinear`, kernel [layers?, experts, in, out]) get one adapter per
expert, `ExpertLoRA`: A [layers?, experts, in, rank], B [layers?, experts, rank, out], named `expert`
like the kernel so expert parallelism splits them with it. The MoE dispatch applies them
(`lm.model.moe.ExpertWeights`): grouped matmuls on the sorted rows, or the capacity einsums.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from qwix._src.core import qarray

from lm.config import LoraConfig
from lm.errors import UserError
from lm.model.blocks import ExpertLinear
from lm.model.moe import ExpertWeights
from sharding.rules import axes

TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
QUANT_BLOCK = 64  # QLoRA's nf4 block size along the input axis


class Quantized(nnx.Variable):
    """A frozen, quantised base weight (qwix QArray parts): never a Param, so never trained or decayed."""


class DropoutSalt(nnx.Variable):
    """A per-layer constant folded into the step's dropout key, so each layer draws its own mask."""


class DropoutKey(nnx.Variable):
    """A training step's dropout key data, set by `seed_dropout` on the step's own copy of the model."""


def seed_dropout(model: nnx.Module, key: jax.Array | None) -> None:
    """Give every adapter with dropout this key (None: take it away). Only the train step calls this,
    on the copy of the model it differentiates, so evaluation and decoding never drop."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRA) and module.dropout > 0:
            if key is None:
                module.step_key = nnx.data(None)
                continue
            data = jax.random.key_data(key)
            module.step_key = DropoutKey(jnp.broadcast_to(data, module.salt.shape[:-1] + data.shape))


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

    def __init__(self, base: nnx.Linear | nnx.LinearGeneral | ExpertLinear, spec: LoraConfig, key: jax.Array):
        kernel = base.kernel
        self.n_in, n_out = _n_in(base), _n_out(base)
        self.experts = isinstance(base, ExpertLinear)  # an expert axis after the layer axis
        lead = kernel.ndim - self.n_in - n_out  # layers (1 for a stack built by nnx.vmap, else 0), experts
        names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        shape = kernel.shape
        in_shape, out_shape = shape[lead : lead + self.n_in], shape[lead + self.n_in :]
        # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0,
        # so a fresh adapter leaves the model's outputs exactly as they were.
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(key, shape[: lead + self.n_in] + (spec.rank,), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, **axes(*names[: lead + self.n_in], None))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros(shape[:lead] + (spec.rank,) + out_shape, jnp.float32),
            **axes(*names[:lead], None, *names[lead + self.n_in :]),
        )
        self.scale = spec.scale
        self.dropout = spec.dropout
        self.step_key = nnx.data(None)  # a DropoutKey while a train step runs (seed_dropout)
        # [layers?, 1]: nnx.scan drops a 1-D variable's 'layers' name when run eagerly (flax 0.12.8).
        salt = jax.random.randint(jax.random.fold_in(key, 1), shape[:lead] + (1,), 0, 2**31 - 1, jnp.int32)
        self.salt = DropoutSalt(salt, **axes(*names[:lead], None))
        self.enabled = True  # False inside `adapters_off`: the base projection alone
        self.qtype = None
        self.base = base
        if spec.base_dtype in ("int8", "nf4"):
            self.qtype = spec.base_dtype
            q = _quantize(kernel[...], lead - self.experts, self.experts + self.n_in - 1, spec.base_dtype)
            self.qvalue = Quantized(q.qvalue, **axes(*names))
            # The blocked axis of the scales is shorter than the kernel's: left unsharded.
            scale_names = tuple(None if s != k else n for s, k, n in zip(q.scale.shape, shape, names))
            self.qscale = Quantized(q.scale, **axes(*scale_names))
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
        if not self.enabled:
            return y
        contract = tuple(range(x.ndim - self.n_in, x.ndim))
        if self.dropout > 0 and self.step_key is not None:
            key = jax.random.wrap_key_data(self.step_key[...])
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt[...][0]), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a, b = self.lora_a[...].astype(y.dtype), self.lora_b[...].astype(y.dtype)
        xa = jax.lax.dot_general(x.astype(y.dtype), a, ((contract, tuple(range(self.n_in))), ((), ())))
        delta = jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))
        return y + (self.scale * delta).astype(y.dtype)

    def folded(self, kernel: jax.Array, dtype) -> jax.Array:
        """kernel + scale * A B, summed in float32 and cast to `dtype`: a stacked kernel one layer at
        a time, so the float32 temporaries are one layer's (an 8B MLP's: 235 MB, not 7.5 GB)."""
        lead = self.lora_a.ndim - self.n_in - 1 - self.experts
        a, b, scale = self.lora_a[...], self.lora_b[...], jnp.float32(self.scale)
        return _fold(kernel, a, b, scale, lead=lead, experts=self.experts, dtype=dtype)


class ExpertLoRA(LoRA):
    """One adapter per expert on an ExpertLinear: expert e computes x W_e + scale * (x A_e) B_e.

    The MoE layer asks for `weights()` rather than calling it: the dispatch (lm.model.moe) applies
    kernel and factors to the rows sorted by expert, on whichever devices hold that expert."""

    def weights(self, dtype) -> ExpertWeights:
        kernel = self.kernel().astype(dtype)
        if not self.enabled:
            return ExpertWeights(kernel)
        return ExpertWeights(kernel, self.lora_a[...].astype(dtype), (self.scale * self.lora_b[...]).astype(dtype))

    def __call__(self, x):
        raise TypeError("an expert adapter is applied by the MoE dispatch (ExpertLoRA.weights), not called")


@functools.partial(jax.jit, static_argnames=("lead", "experts", "dtype"))
def _fold(kernel, a, b, scale, *, lead: int, experts: bool, dtype):
    def one(k, a, b):
        if experts:  # [experts, in, r] x [experts, r, out]: each expert its own product
            delta = jnp.einsum("eir,ero->eio", a, b, precision=jax.lax.Precision.HIGHEST)
        else:
            delta = jnp.dot(a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1), precision=jax.lax.Precision.HIGHEST)
        return (k.astype(jnp.float32) + scale * delta.reshape(k.shape)).astype(dtype)

    return jax.lax.map(lambda x: one(*x), (kernel, a, b)) if lead else one(kernel, a, b)


def _project(x, kernel, base, n_in: int):
    """What `base(x)` computes, with `kernel` in place of the module's own (same dot_general)."""
    bias = base.bias[...] if base.bias is not None else None
    x, kernel, bias = base.promote_dtype((x, kernel, bias), dtype=base.dtype)
    contract = tuple(range(x.ndim - n_in, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())), precision=base.precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
    return y


def _quantize(kernel: jax.Array, lead: int, axis: int, qtype: str) -> qarray.QArray:
    """Per output channel (and per layer and expert), in blocks of QUANT_BLOCK along `axis`, the last
    input axis within one layer's kernel.

    A stacked kernel is quantised one layer at a time (lax.map), so the float32 working copy is one
    layer's, not the stack's: for Llama 3.1 8B's MLP that is 235 MB instead of 7.5 GB."""
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


PROJECTIONS = (nnx.Linear, nnx.LinearGeneral, ExpertLinear)


def targets(model: nnx.Module, pattern: str) -> list[tuple[tuple, nnx.Module]]:
    """(path, module) of every projection (Linear, LinearGeneral, an MoE layer's ExpertLinear) whose
    dotted path fully matches `pattern` (a regex that LoraConfig has checked)."""
    regex = re.compile(pattern)
    found = [
        (path, module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, PROJECTIONS) and regex.fullmatch(_dotted(path))
    ]
    if not found:
        names = [_dotted(p) for p, m in nnx.iter_modules(model) if isinstance(m, PROJECTIONS)]
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


def apply(model: nnx.Module, spec: LoraConfig, seed: int = 0) -> list[str]:
    """Adapt the projections matching spec.targets in place; return their paths.

    The frozen base is cast to spec.base_dtype (bfloat16, or float32 for exact tests); with int8 or
    nf4 the adapted kernels are quantised and everything else frozen is kept in bfloat16.
    """
    found = targets(model, spec.targets)
    experts = [_dotted(p) for p, m in found if isinstance(m, ExpertLinear)]
    if experts and spec.dropout > 0:
        raise UserError(
            f"lora.dropout={spec.dropout} cannot reach the expert adapters ({experts[0]}, ...); set lora.dropout=0 "
            "or leave the experts out of lora.targets (PEFT's expert adapters refuse dropout too)"
        )
    keys = jax.random.split(jax.random.key(seed), len(found))
    for (path, module), key in zip(found, keys):
        adapter = ExpertLoRA if isinstance(module, ExpertLinear) else LoRA
        _set(_parent(model, path), path[-1], adapter(module, spec, key))
    store = jnp.float32 if spec.base_dtype == "float32" else jnp.bfloat16
    frozen = nnx.state(model, FROZEN)
    nnx.update(model, jax.tree.map(lambda x: x.astype(store), frozen))
    return [_dotted(p) for p, _ in found]


@contextlib.contextmanager
def adapters_off(model: nnx.Module):
    """Run the frozen base alone while inside: every adapter adds nothing (PEFT's `disable_adapter`).

    DPO and GRPO under LoRA take this as their reference model, so no second copy of the weights
    exists. The switch is a static attribute, so a jitted function traced inside sees the base."""
    found = [m for _, m in nnx.iter_modules(model) if isinstance(m, LoRA)]
    for m in found:
        m.enabled = False
    try:
        yield model
    finally:
        for m in found:
            m.enabled = True


def merge(model: nnx.Module, base: nnx.Module | None = None) -> nnx.Module:
    """Fold every adapter into a kernel and return the plain model (export, fast decode).

    base: the model the adapters were trained on as init.from holds it (its own weights and dtype):
    the adapters are folded into its kernels, and it is returned. Without it the adapters are folded,
    in place, into the model's own base, which for QLoRA is the dequantised 4/8-bit copy (what
    training saw) and for a bfloat16 base is bfloat16.
    """
    for path, module in list(nnx.iter_modules(model)):
        if not isinstance(module, LoRA):
            continue
        if base is not None:
            target = _parent(base, path)
            target = target[path[-1]] if isinstance(path[-1], int) else getattr(target, path[-1])
            target.kernel[...] = module.folded(target.kernel[...], target.kernel.dtype)
            continue
        plain = module.base
        if module.qtype is None:
            plain.kernel[...] = module.folded(plain.kernel[...], plain.kernel.dtype)
        else:
            names = module.qvalue.get_metadata().get("out_sharding")
            plain.kernel = nnx.Param(module.folded(module.kernel(), jnp.bfloat16), **axes(*names))
        _set(_parent(model, path), path[-1], plain)
    return model if base is None else base


def adapters(model: nnx.Module) -> dict[str, LoRA]:
    """Dotted path -> LoRA module, in model order."""
    return {_dotted(p): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRA)}


def computed(model: nnx.Module) -> int:
    """Adapter parameters a token computes with (MFU counts what is computed): an expert's adapter
    serves only the tokens routed to it, experts_per_token of n_experts."""
    cfg, total = model.cfg, 0.0
    for module in adapters(model).values():
        n = module.lora_a.size + module.lora_b.size
        total += n * cfg.experts_per_token / cfg.n_experts if isinstance(module, ExpertLoRA) else n
    return int(total)


def count(model: nnx.Module) -> tuple[int, int]:
    """(trainable adapter parameters, frozen parameters incl. quantised ones)."""
    n = lambda state: sum(x.size for x in jax.tree.leaves(state))  # noqa: E731
    return n(nnx.state(model, TRAINABLE)), n(nnx.state(model, nnx.Any(FROZEN, Quantized)))
