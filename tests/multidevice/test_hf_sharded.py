"""On 8 fake CPU devices: a Hugging Face import lands on the parameters' final shardings and
computes what the single-device import computes; an export from the sharded model is the same file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import MeshConfig
from lm.hf import hf_tensors, load_hf
from sharding.mesh import Layout

pytest.importorskip("transformers")


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2)])
@pytest.mark.parametrize("scan", [True, False])
def test_sharded_import_is_placed_and_equals_single_device(tmp_path, shape, scan):
    from hf_models import hf_logits, sample_tokens, save_hf_checkpoint

    reference = save_hf_checkpoint("llama", tmp_path)  # 6 heads, 2 kv heads, width 48, 3 layers
    data, fsdp, tensor = shape
    layout = Layout.build(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[: data * fsdp * tensor])
    mesh = layout.mesh
    with layout:
        model = load_hf(tmp_path, scan_layers=scan, layout=layout)
        state = nnx.state(model, nnx.Param)
        want = nnx.get_named_sharding(state, mesh)
        for (path, var), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want)):
            assert var.get_value().sharding.is_equivalent_to(sharding.get_value(), var.ndim), path
        split = [v for _, v in nnx.to_flat_state(state) if v.get_value().sharding.shard_shape(v.shape) != v.shape]
        assert split, "nothing was sharded"
        tokens = sample_tokens()
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits = np.asarray(jax.jit(lambda m, t, p: m(t, p))(model, jnp.asarray(tokens), positions))
    np.testing.assert_allclose(logits, hf_logits(reference, tokens), atol=1e-4)
    single = dict(hf_tensors(load_hf(tmp_path, scan_layers=scan)))
    for name, tensor_ in hf_tensors(model):
        assert np.array_equal(tensor_, single[name]), name
