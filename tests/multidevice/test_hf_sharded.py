"""On 8 fake CPU devices: a Hugging Face import lands on the parameters' final shardings and
computes what the single-device import computes; an export from the sharded model is the same file.
Mixtures of experts stream expert by expert onto kernels split over mesh.expert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm.config import MeshConfig
from lm.hf import hf_tensors, load_hf
from lm.hf.convert import _set_at
from sharding.mesh import Layout

pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "family, shape, scan",
    [
        ("llama", (1, 4, 2, 1), True),  # 6 heads, 2 kv heads, width 48, 3 layers
        ("llama", (1, 4, 2, 1), False),
        ("llama", (2, 2, 2, 1), True),
        ("llama", (2, 2, 2, 1), False),
        ("qwen2_moe", (1, 2, 1, 4), True),  # 4 experts over mesh.expert=4; a (dense, experts) run and a dense one
        ("qwen3_moe", (1, 2, 2, 2), True),  # 6 experts over 2, their hidden width over tensor; a dense run first
    ],
)
def test_sharded_import_is_placed_and_equals_single_device(tmp_path, family, shape, scan):
    from hf_models import hf_logits, sample_tokens, save_hf_checkpoint

    reference = save_hf_checkpoint(family, tmp_path)
    data, fsdp, tensor, expert = shape
    layout = Layout.build(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=expert), jax.devices())
    mesh = layout.mesh
    with layout:
        model = load_hf(tmp_path, scan_layers=scan, layout=layout)
        state = nnx.state(model, nnx.Param)
        want = nnx.get_named_sharding(state, mesh)
        for (path, var), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want)):
            assert var.get_value().sharding.is_equivalent_to(sharding.get_value(), var.ndim), path
        split = [v for _, v in nnx.to_flat_state(state) if v.get_value().sharding.shard_shape(v.shape) != v.shape]
        assert split, "nothing was sharded"
        if expert > 1:  # every routed expert kernel [layers, experts, in, out] holds experts / mesh.expert
            kernels = [
                v for p, v in nnx.to_flat_state(state) if p[-1] == "kernel" and "expert" in v.get_value().sharding.spec
            ]
            assert len(kernels) == 3 * len({p[:-3] for p, _ in nnx.to_flat_state(state) if p[-2] == "router"})
            for v in kernels:
                assert v.get_value().sharding.shard_shape(v.shape)[1] == v.shape[1] // expert
            # Each HF tensor (one layer's one expert) is written into its slice where the slice lives:
            # the in-place update moves nothing between devices, so no device ever holds more than its shard.
            stack = kernels[0].get_value()
            part = jax.device_put(
                np.ones(stack.shape[2:], stack.dtype), NamedSharding(mesh, P(*stack.sharding.spec[2:]))
            )
            hlo = _set_at.lower(stack, part, (0, 1)).compile().as_text()
            assert not any(op in hlo for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute"))
        tokens = sample_tokens()
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits = np.asarray(jax.jit(lambda m, t, p: m(t, p))(model, jnp.asarray(tokens), positions))
    np.testing.assert_allclose(logits, hf_logits(reference, tokens), atol=1e-4)
    single = dict(hf_tensors(load_hf(tmp_path, scan_layers=scan)))
    for name, tensor_ in hf_tensors(model):
        assert np.array_equal(tensor_, single[name]), name
