"""On 8 fake CPU devices: sharding changes where bytes live, not what is computed."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from lm.config import MeshConfig, ModelConfig, OptimizerConfig
from lm.errors import UserError
from lm.model import Transformer
from lm.state.optimizer import make_optimizer
from lm.train.step import train_step
from sharding.mesh import Layout, make_mesh
from sharding.partition import check_divisible, create_sharded, put_batch
from sharding.rules import logical_rules, logical_to_spec

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, d_ff=128, max_seq_len=64)
MESHES = [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)]
RULES = logical_rules()


def batches(n, batch=16, length=32, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        tokens = rng.integers(0, CFG.vocab_size, (batch, length + 1)).astype(np.int32)
        yield {
            "tokens": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            "segment_ids": np.ones((batch, length), np.int32),
            "weights": np.ones((batch, length), np.float32),
        }


def build(mesh, cfg=CFG, sgd=False):
    def make():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        if sgd:  # the update is the gradient itself, so equal parameters mean equal gradients
            return model, nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
        return model, make_optimizer(model, OptimizerConfig(lr=1e-2, warmup_steps=0), 10)

    with Layout(mesh, RULES):
        return create_sharded(make, Layout(mesh, RULES))


def run_steps(mesh, n=3, grad_accum=1, cfg=CFG, sgd=False, length=32):
    model, opt = build(mesh, cfg, sgd)
    out = []
    with Layout(mesh, RULES):
        for b in batches(n, length=length):
            m = train_step(model, opt, put_batch(b, Layout(mesh, RULES)), grad_accum=grad_accum)
            out.append((float(m["loss"]), float(m["grad_norm"])))
    return out, model


def mesh_of(shape, devices=None):
    return make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), devices)


@pytest.fixture(scope="module")
def single_device():
    return run_steps(mesh_of((1, 1, 1), jax.devices()[:1]))[0]


@pytest.mark.parametrize("shape", MESHES)
def test_shard_shapes_follow_logical_rules(shape):
    mesh = mesh_of(shape)
    model, opt = build(mesh)
    for state in (nnx.state(model, nnx.Param), nnx.state(opt, nnx.optimizer.OptState)):
        for path, var in nnx.to_flat_state(state):
            names = var.get_metadata().get("out_sharding")
            value = var.get_value()
            if not names:
                continue
            spec = logical_to_spec(names, RULES)
            expected = list(value.shape)
            for dim, axes in enumerate(spec):
                axes = (axes,) if isinstance(axes, str) else (axes or ())
                for a in axes:
                    expected[dim] //= mesh.shape[a]
            for shard in value.addressable_shards:
                assert shard.data.shape == tuple(expected), (path, shard.data.shape, expected)


@pytest.mark.parametrize("shape", MESHES)
def test_first_steps_match_single_device(shape, single_device):
    sharded, _ = run_steps(mesh_of(shape))
    np.testing.assert_allclose(sharded, single_device, rtol=1e-5)


@pytest.mark.parametrize("shape", MESHES)
def test_per_device_bytes_shrink_with_fsdp_and_tensor(shape):
    mesh = mesh_of(shape)
    model, opt = build(mesh)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param)) + jax.tree.leaves(nnx.state(opt))
    total = sum(x.nbytes for x in leaves)
    device0 = jax.devices()[0]
    on_device0 = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device0)
    expected = total / (shape[1] * shape[2])
    assert abs(on_device0 - expected) / expected < 0.15, (on_device0, expected)


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_one_big_batch(k):
    mesh = mesh_of((2, 2, 2))
    big, model_a = run_steps(mesh, n=2, sgd=True)
    acc, model_b = run_steps(mesh, n=2, grad_accum=k, sgd=True)
    np.testing.assert_allclose(acc, big, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(model_a, nnx.Param)), jax.tree.leaves(nnx.state(model_b, nnx.Param))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_indivisible_mesh_is_a_clear_error_before_compile():
    cfg = dataclasses.replace(CFG, n_kv_heads=2)
    mesh = mesh_of((1, 2, 4))
    with pytest.raises(UserError, match=r"model.n_kv_heads=2 is not divisible by mesh.tensor=4"):
        check_divisible(cfg.logical_dims(), Layout(mesh, RULES))
    for field, value, message in [
        ("vocab_size", 250, r"model.vocab_size=250 is not divisible by mesh.tensor=4"),
        ("d_ff", 126, r"model.d_ff=126 is not divisible by mesh.tensor=4"),
        ("d_model", 63, r"model.d_model=63 is not divisible by mesh.fsdp=2"),
    ]:
        bad = (
            dataclasses.replace(CFG, n_heads=4, n_kv_heads=4, **{field: value})
            if field != "d_model"
            else dataclasses.replace(CFG, n_heads=1, n_kv_heads=1, d_model=63, head_dim=64)
        )
        with pytest.raises(UserError, match=message):
            check_divisible(bad.logical_dims(), Layout(mesh, RULES))
    batch = {"batch": (6, "train.batch_size/grad_accum")}
    message = r"train.batch_size/grad_accum=6 is not divisible by mesh.data\*mesh.fsdp\*mesh.expert=4"
    with pytest.raises(UserError, match=message):
        check_divisible(batch, Layout(mesh_of((2, 2, 2)), RULES))
    with pytest.raises(UserError, match="devices"):
        make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    with pytest.raises(UserError, match="at most one"):
        make_mesh(MeshConfig(data=-1, fsdp=-1, tensor=1))


def test_restore_onto_a_different_mesh_continues_with_the_same_loss(tmp_path):
    import grain

    from lm.config import CheckpointConfig
    from lm.state.checkpoint import Checkpointer, CheckpointMeta

    first, second, third = batches(3)
    mesh_a = mesh_of((8, 1, 1))
    model, opt = build(mesh_a)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    with Layout(mesh_a, RULES):
        for b in (first, second):
            train_step(model, opt, put_batch(b, Layout(mesh_a, RULES)))
        ckpt.save(2, model, opt, iter(grain.MapDataset.range(8).to_iter_dataset()), CheckpointMeta())
        expected = float(train_step(model, opt, put_batch(third, Layout(mesh_a, RULES)))["loss"])

    for shape, devices in (((2, 2, 2), None), ((1, 1, 1), jax.devices()[:1])):
        mesh_b = mesh_of(shape, devices)
        model_b, opt_b = build(mesh_b)
        with Layout(mesh_b, RULES):
            ckpt.restore(2, model_b, opt_b, iter(grain.MapDataset.range(8).to_iter_dataset()))
            kernel = model_b.blocks.mlp.up.kernel[...]
            assert kernel.sharding.mesh.shape == mesh_b.shape  # restored straight onto the new mesh
            got = float(train_step(model_b, opt_b, put_batch(third, Layout(mesh_b, RULES)))["loss"])
        assert got == pytest.approx(expected, rel=1e-5), shape


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_splash_attention_under_a_mesh_matches_single_device(kv_heads):
    cfg = dataclasses.replace(CFG, attention_impl="splash_interpret", max_seq_len=128, n_kv_heads=kv_heads)
    xla = dataclasses.replace(cfg, attention_impl="xla")
    single, _ = run_steps(mesh_of((1, 1, 1), jax.devices()[:1]), n=1, cfg=xla, length=128)
    sharded, _ = run_steps(mesh_of((2, 2, 2)), n=1, cfg=cfg, length=128)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_splash_lowers_for_tpu_per_shard_with_gqa():
    """The real kernel (interpret off) inside shard_map on a (2, 2, 2) mesh, 8 query and 2 K/V heads."""
    cfg = dataclasses.replace(CFG, attention_impl="splash", max_seq_len=512, n_kv_heads=2, dtype="bfloat16")
    mesh = mesh_of((2, 2, 2))
    model, opt = build(mesh, cfg)
    with Layout(mesh, RULES):
        batch = put_batch(next(batches(1, length=512)), Layout(mesh, RULES))
        text = train_step.trace(model, opt, batch).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text and "512x512x" not in text


def test_cudnn_lowers_for_cuda_under_a_mesh_without_a_square_operand(monkeypatch):
    """Under a mesh jax wraps cuDNN attention in custom partitioning (the `__cudnn$fmha` call itself
    appears only when XLA compiles for the GPU); its operands are q, k, v and per-document lengths
    and offsets, never a [T, T] mask. jax's cuDNN probes are stood in for, as in test_lowering.py."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    cfg = dataclasses.replace(CFG, attention_impl="cudnn", max_seq_len=512, n_kv_heads=2, dtype="bfloat16")
    mesh = mesh_of((2, 2, 2))
    model, opt = build(mesh, cfg)
    with Layout(mesh, RULES):
        batch = put_batch(next(batches(1, length=512)), Layout(mesh, RULES))
        text = train_step.trace(model, opt, batch).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call @CustomSPMDPartitioning" in text and "512x512x" not in text


def test_dpo_reference_copy_is_sharded_like_the_policy_and_microbatches_match_one_device():
    """A full fine-tune's DPO reference (lm.train.preference_run.reference_model): the starting weights
    in their own buffers with the policy's shardings; DPO with grad_accum=2 (microbatches of whole
    pairs) on a (2, 2, 2) mesh gives the metrics and weights of one big batch on one device."""
    from lm.config import LoraConfig, Recipe
    from lm.data.preference import Pair, pair_batch
    from lm.train.preference_run import reference_model
    from lm.train.step import dpo_train_step

    r = Recipe()
    recipe = dataclasses.replace(r, model=CFG, lora=LoraConfig(rank=0), train=dataclasses.replace(r.train, seq_len=32))
    rng = np.random.default_rng(0)
    pairs = [Pair(*(list(rng.integers(1, 255, n)) for n in (3, 4, 5))) for _ in range(8)]
    batch = pair_batch(pairs, 16)
    rows = []
    for mesh, k in ((mesh_of((1, 1, 1), jax.devices()[:1]), 1), (mesh_of((2, 2, 2)), 2)):
        model, opt = build(mesh, sgd=True)
        layout = Layout(mesh, RULES)
        with layout:
            reference = reference_model(recipe, layout, model, None)
            flat = zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(reference)))
            for (path, a), (_, r) in flat:
                assert a.get_value().sharding == r.get_value().sharding, path
                assert a.get_value() is not r.get_value()
            nnx.update(model, jax.tree.map(lambda x: x + 0.02, nnx.state(model, nnx.Param)))
            m = dpo_train_step(model, opt, put_batch(batch, layout), reference, beta=0.5, loss_type="sigmoid",
                               grad_accum=k)  # fmt: skip
            rows.append((jax.device_get(m), [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]))
    (one, one_params), (sharded, sharded_params) = rows
    assert one["reward_margin"] > 1e-3
    for key in ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
        np.testing.assert_allclose(sharded[key], one[key], rtol=2e-5, atol=1e-6, err_msg=key)
    for a, b in zip(one_params, sharded_params, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
