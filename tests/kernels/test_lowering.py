"""Accelerator paths checked on this CPU by lowering for TPU and CUDA (`.lower(lowering_platforms=...)`).

What is checked: the real kernel is in the lowered module (splash: `tpu_custom_call`, the Mosaic
kernel with interpret off; cuDNN: the `__cudnn$fmha*` custom calls), and no tensor there ends in
two sequence-length dimensions, i.e. no [T, T] scores, mask or bias exist where flash attention is
used. What is not: Mosaic compiling the kernel and cuDNN accepting the graph (both happen only at
compile time on the device), and the numbers of the cuDNN path. jax refuses to trace cuDNN without
a GPU (`cuDNN is not detected`), so these tests stand in a version number and a Hopper compute
capability for jax's probes; the shipped code has no such bypass.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import kernels
from lm.config import ModelConfig, OptimizerConfig, preset
from lm.errors import UserError
from lm.kernels import attention, resolve_attention_impl
from lm.kernels.cudnn import segment_lengths_and_offsets
from lm.model import Transformer
from lm.state.optimizer import make_optimizer
from lm.train.step import train_step

# No model dimension equals a tested length, so a [.., T, T] type can only be attention scores.
CFG = ModelConfig(
    vocab_size=320, d_model=96, head_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=1024,
    dtype="bfloat16",
)  # fmt: skip
KERNEL = {"splash": "tpu_custom_call", "cudnn": "__cudnn$fmhaSoftmax"}
PLATFORM = {"splash": "tpu", "cudnn": "cuda"}


@pytest.fixture
def cudnn_probes(monkeypatch):
    """Let jax trace its cuDNN attention on a machine without CUDA: a version and a Hopper GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(kernels, "_local_gpu_capability", lambda: (9, 0))


def square_types(text: str, length: int) -> set[str]:
    return set(re.findall(rf"tensor<(?:\d+x)*{length}x{length}x\w+>", text))


def lowered_train_step(cfg, length: int, platform: str, batch_size: int = 2) -> str:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, OptimizerConfig(), 10, 0)
    ids = jnp.zeros((batch_size, length), jnp.int32)
    batch = {"tokens": ids, "targets": ids, "positions": ids, "segment_ids": ids + 1}
    batch["weights"] = jnp.ones((batch_size, length), jnp.float32)
    return train_step.trace(model, optimizer, batch).lower(lowering_platforms=(platform,)).as_text()


def lowered_prefill(cfg, width: int, platform: str, batch_size: int = 2) -> str:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.init_cache(batch_size, 64, cfg.compute_dtype)

    @nnx.jit
    def prefill(model, tokens, lengths):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model(tokens, positions, (positions < lengths[:, None]).astype(jnp.int32), mode="prefill")

    tokens = jnp.zeros((batch_size, width), jnp.int32)
    traced = prefill.trace(model, tokens, jnp.full((batch_size,), width - 3))
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("length", [64, 256, 1024])
@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_train_step_lowers_to_the_flash_kernel_without_a_square_operand(impl, length, cudnn_probes):
    text = lowered_train_step(ModelConfig(**{**CFG.__dict__, "attention_impl": impl}), length, PLATFORM[impl])
    assert KERNEL[impl] in text
    assert not square_types(text, length)


@pytest.mark.parametrize("width", [16, 40])
@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_prefill_lowers_to_the_flash_kernel_at_short_widths(impl, width, cudnn_probes):
    text = lowered_prefill(ModelConfig(**{**CFG.__dict__, "attention_impl": impl}), width, PLATFORM[impl])
    assert KERNEL[impl] in text
    assert not square_types(text, width)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_attention_is_seen_by_the_square_check(platform):
    """The check above can fail: XLA attention builds [T, T] scores and no kernel call. (At 64
    tokens it is one query block; longer sequences are split into blocks of queries, lm.kernels.xla.query_blocks.)"""
    text = lowered_train_step(ModelConfig(**{**CFG.__dict__, "attention_impl": "xla"}), 64, platform)
    assert square_types(text, 64)
    assert not any(kernel in text for kernel in KERNEL.values())


@pytest.mark.parametrize("backend, impl", [("tpu", "splash"), ("gpu", "cudnn")])
def test_auto_picks_the_platforms_flash_kernel(backend, impl, monkeypatch, cudnn_probes):
    """auto decides at trace time from jax.default_backend(); stand in the accelerator's name."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    text = lowered_train_step(CFG, 256, PLATFORM[impl])
    assert KERNEL[impl] in text
    assert not square_types(text, 256)


def test_auto_falls_back_to_xla_where_the_kernel_cannot_do_the_layer(monkeypatch):
    """cuDNN has no float32 kernel, no soft-capping, and packs documents only on Hopper; auto then
    uses XLA and says why."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    text = lowered_train_step(ModelConfig(**{**CFG.__dict__, "dtype": "float32"}), 64, "cuda")
    assert "cudnn" not in text and square_types(text, 64)
    hopper, ampere = (9, 0), (8, 0)
    assert resolve_attention_impl(CFG, "gpu", 256, softcap=50.0, gpu_capability=hopper) == (
        "xla", "cuDNN flash attention has no logit soft-capping"
    )  # fmt: skip
    assert resolve_attention_impl(CFG, "gpu", 256, gpu_capability=ampere)[0] == "xla"
    assert resolve_attention_impl(CFG, "gpu", 256, gpu_capability=ampere, packed=False)[0] == "cudnn"


def test_resolve_names_the_kernel_and_refuses_one_the_platform_lacks():
    assert resolve_attention_impl(CFG, "cpu", 256)[0] == "xla"
    assert resolve_attention_impl(CFG, "tpu", 40)[1].endswith("(length 40 -> 128, block 128)")
    assert resolve_attention_impl(CFG, "gpu", 256, gpu_capability=(9, 0))[0] == "cudnn"
    for name in ("llama3_8b", "llama3_1b", "mistral_7b", "qwen3_0_6b"):  # large presets: flash by default
        assert resolve_attention_impl(preset(name), "gpu", 8192, gpu_capability=(9, 0))[0] == "cudnn", name
        assert resolve_attention_impl(preset(name), "tpu", 8192)[0] == "splash", name
    # Under mesh.context the context kernel runs; on a TPU the shards run splash (allgather: its mask
    # built for the queries' order; ring: per chunk pair), and the XLA blocks for windows traced in the scan.
    impl, why = resolve_attention_impl(preset("llama3_8b"), "tpu", 8192, context_devices=8)
    assert impl == "allgather" and why.startswith("mesh.context=8: allgather"), why
    assert "each shard splash over the gathered K/V, its mask built for the queries' order" in why, why
    ring = ModelConfig(**{**preset("llama3_8b").__dict__, "context_parallel": "ring"})
    impl, why = resolve_attention_impl(ring, "tpu", 8192, context_devices=8)
    assert impl == "ring" and "each shard splash per pair of query and key chunks" in why, why
    windowed = ModelConfig(**{**ring.__dict__, "sliding_window": 4096, "sliding_window_every": 1})
    why = resolve_attention_impl(windowed, "tpu", 8192, context_devices=8)[1]
    assert "; windowed layers: an online softmax over XLA" in why, why
    gemma = ModelConfig(**{**CFG.__dict__, "sliding_window": 64, "sliding_window_every": 2})
    for cfg, platform in ((preset("llama3_8b"), "gpu"), (ring, "gpu"), (gemma, "tpu")):
        impl, why = resolve_attention_impl(cfg, platform, 8192, context_devices=8, gpu_capability=(9, 0))
        assert why.startswith(f"mesh.context=8: {impl}") and "each shard an online softmax over XLA" in why, why
    cpu = ModelConfig(**{**CFG.__dict__, "dtype": "auto"})
    for impl in ("cudnn", "splash"):
        with pytest.raises(UserError, match=f"attention_impl={impl} needs a"):
            resolve_attention_impl(ModelConfig(**{**cpu.__dict__, "attention_impl": impl}), "cpu", 64)
    interpreted = ModelConfig(**{**cpu.__dict__, "attention_impl": "splash_interpret"})
    assert resolve_attention_impl(interpreted, "cpu", 64)[0] == "splash_interpret"


def test_cudnn_segments_match_a_loop_over_documents():
    segment_ids = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4], [1, 2, 3, 4, 5, 6, 7, 0]], np.int32)
    lengths, offsets, count = segment_lengths_and_offsets(jnp.asarray(segment_ids), 4)
    for row, seg in enumerate(segment_ids):
        starts = [t for t in range(len(seg)) if seg[t] and (t == 0 or seg[t] != seg[t - 1])]
        runs = [sum(1 for _ in filter(lambda x: x == seg[s], seg[s:])) for s in starts]  # contiguous runs
        assert count[row] == len(starts)
        want_starts = (starts + [-1] * 5)[:5]
        want_lengths = (runs + [-1] * 4)[:4]
        assert offsets[row].tolist() == want_starts and lengths[row].tolist() == want_lengths


@pytest.mark.parametrize("length", [40, 128])
@pytest.mark.parametrize("window, softcap", [(None, None), (24, None), (None, 5.0)])
def test_interpreted_splash_matches_xla_with_gqa_padding_window_and_softcap(length, window, softcap):
    """The Pallas kernel itself (interpreted) against the XLA path: GQA, documents, padding, features."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, length, 4, 32)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 32)), jnp.float32) for _ in range(2))
    cut = length // 3
    segments = [np.ones((2, cut)), np.full((2, length - cut - 5), 2), np.zeros((2, 5))]
    segment_ids = jnp.asarray(np.concatenate(segments, 1), jnp.int32)

    def attend(impl):
        def f(q, k, v):
            out = attention(q, k, v, segment_ids, impl=impl, sliding_window=window, softcap=softcap)
            return jnp.where(segment_ids[..., None, None] != 0, out, 0)  # padding rows are don't-care

        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

    (want, want_grads), (got, got_grads) = attend("xla"), attend("splash_interpret")
    np.testing.assert_allclose(got, want, atol=2e-5)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_run_trained_with_another_platforms_kernel_generates_here_with_auto():
    """splash (TPU) or cuDNN (GPU) in a checkpoint's recipe is that hardware's choice, not the model's."""
    from lm.kernels import for_platform

    for impl in ("splash", "cudnn"):
        assert for_platform(impl, "cpu") == "auto"
    assert for_platform("splash", "tpu") == "splash" and for_platform("cudnn", "cuda") == "cudnn"
    assert for_platform("xla", "cpu") == "xla" and for_platform("splash_interpret", "cpu") == "splash_interpret"
