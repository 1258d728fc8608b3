"""Measurements behind launch.bench and launch.plan: training throughput, decode speed, compile time,
memory, and XLA's compiled memory analysis that keeps the planner's estimates honest.

Every number comes from timing real jitted calls after a warm-up, or from XLA's own account;
nothing is estimated except MFU's FLOP count (ModelConfig.flops_per_token, the PaLM formula).
"""

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import lora
from lm.config import MeshConfig, ModelConfig, Recipe, TrainConfig
from lm.hardware import device_for_kind, peak_tflops_per_device
from lm.infer.decode import generate
from lm.model import Transformer
from lm.plan import Plan
from lm.state.optimizer import make_optimizer
from lm.train.compile_cache import use_compilation_cache
from lm.train.profile import summarize
from lm.train.step import train_step
from sharding.mesh import Layout, make_mesh
from sharding.partition import batch_sharding, check_divisible, create_sharded, process_rows, put_batch
from sharding.rules import logical_rules


def synthetic_batch(recipe: Recipe, layout: Layout, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens with the pipeline's layout: this process's rows of one global batch."""
    t, m = recipe.train, recipe.model
    rows = len(process_rows(layout, t.batch_size))
    tokens = np.random.default_rng(seed).integers(0, m.vocab_size, (rows, t.seq_len + 1)).astype(np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), (rows, t.seq_len)).copy(),
        "segment_ids": np.ones((rows, t.seq_len), np.int32),
        "weights": np.ones((rows, t.seq_len), np.float32),
    }


def _setup(recipe: Recipe, mesh_cfg: MeshConfig | None = None):
    layout = Layout(make_mesh(mesh_cfg or recipe.mesh), logical_rules(recipe.mesh.rules))
    check_divisible(recipe.logical_dims(), layout)
    with layout:

        def make():
            model = Transformer(recipe.model, rngs=nnx.Rngs(0))
            return model, make_optimizer(model, recipe.optimizer, recipe.train.steps)

        model, opt = create_sharded(make, layout)
    return layout, model, opt


def _device_bytes(tree) -> int:
    """Bytes that the first device holds of a tree of arrays."""
    d0 = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == d0)


def peak_memory(fallback_compiled=None) -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    if fallback_compiled is not None:  # CPU: the compiler's own account of the step
        a = fallback_compiled.memory_analysis()
        return int(a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes - a.alias_size_in_bytes)
    return None


def bench_train(
    recipe: Recipe, steps: int = 10, warmup: int = 2, mesh_cfg: MeshConfig | None = None, profile_dir: str | None = None
) -> dict:
    """Median and fastest step time after `warmup` steps. profile_dir: also trace two more steps there
    with jax.profiler and summarise them by op class (lm.train.profile.summarize)."""
    layout, model, opt = _setup(recipe, mesh_cfg)
    t = recipe.train
    with layout:
        batch = put_batch(synthetic_batch(recipe, layout), layout)
        # The compiled step's memory analysis (CPU) and HLO names (the profile summary).
        need_hlo = profile_dir or jax.devices()[0].platform == "cpu"
        compiled = train_step.lower(model, opt, batch, grad_accum=t.grad_accum).compile() if need_hlo else None
        for _ in range(warmup):
            jax.block_until_ready(train_step(model, opt, batch, grad_accum=t.grad_accum))
        times, cpu = [], []  # cpu: process CPU seconds, which waiting for a busy machine does not inflate
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(train_step(model, opt, batch, grad_accum=t.grad_accum))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        if profile_dir:
            jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
            for _ in range(2):
                jax.block_until_ready(train_step(model, opt, batch, grad_accum=t.grad_accum))
            jax.profiler.stop_trace()
    step_s = statistics.median(times)
    tokens = t.batch_size * t.seq_len
    adapters = lora.computed(model) if recipe.lora.rank else None
    per_s = tokens / step_s / jax.device_count() / 1e12
    tflops = recipe.model.flops_per_token(t.seq_len, adapter_params=adapters) * per_s
    tflops_maxtext = recipe.model.flops_per_token(t.seq_len, "maxtext", adapter_params=adapters) * per_s
    peak, source = peak_tflops_per_device(t.peak_tflops)
    state_bytes = _device_bytes(nnx.state(model)) + _device_bytes(nnx.state(opt))
    extra = {}
    if profile_dir:
        extra["profile"] = {"dir": profile_dir, **summarize(profile_dir, compiled.as_text(), steps=2)}
    return {
        "mesh": layout.shape,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_best": tokens / min(times),
        "step_s_median": step_s,
        "step_s_min": min(times),
        "cpu_s_per_step_median": statistics.median(cpu),
        "tflops_per_device": tflops,
        "mfu": tflops / peak,
        "mfu_convention": "PaLM: 6N + 12*L*T*H*D FLOPs per token (N: non-embedding params + LM head)",
        "mfu_maxtext": tflops_maxtext / peak,
        "peak_tflops": peak,
        "peak_source": source,
        "state_bytes_per_device": state_bytes,
        "peak_bytes_per_device": peak_memory(compiled if jax.devices()[0].platform == "cpu" else None),
        **extra,
    }


def measure_bandwidth(n_bytes: int = 1 << 28) -> float:
    """Device read bandwidth in bytes/s, from summing a large array: the access pattern of batch-1
    decode, which reads every parameter once per step."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    jax.block_until_ready(f(x))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - start)
    return n_bytes / min(times)


def bench_decode(
    recipe: Recipe,
    prompt_len: int = 32,
    new_tokens: int = 256,
    batches=(1, 8),
    contexts=(64, 256, 512),
    uncached: bool = True,
) -> dict:
    """Greedy generation of `new_tokens` after random prompts (the peer yardstick's shape: prompt 32,
    256 new). Per batch size: decode-only speed (prefill excluded) and end-to-end speed (prefill
    included); then ms per step at batch 1 after prompts of each context length. uncached: also time
    recomputing every step (`--kv-cache off`) for the cache's speed-up."""
    cfg = recipe.model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bandwidth = measure_bandwidth()
    rng = np.random.default_rng(0)
    out = {"param_bytes": param_bytes, "bandwidth_bytes_per_s": bandwidth}

    def timed(prompts, n, use_cache, runs=3):
        """The fastest of a few runs after a compiling one: this machine's timings are noisy."""
        generate(model, prompts, max_new_tokens=n, use_cache=use_cache)
        repeats = runs if use_cache else 1
        done = [generate(model, prompts, max_new_tokens=n, use_cache=use_cache) for _ in range(repeats)]
        return min(done, key=lambda g: g.decode_seconds)

    for b in batches:
        prompts = [rng.integers(4, cfg.vocab_size, prompt_len).tolist() for _ in range(b)]
        row = {}
        for use_cache in (True, False) if uncached else (True,):
            g = timed(prompts, new_tokens, use_cache)
            tag = "cache_on" if use_cache else "cache_off"
            row[tag] = {
                "prefill_tokens_per_s": g.prefill_tokens_per_s,
                "decode_tokens_per_s": g.decode_tokens_per_s,
                "new_tokens_per_s": b * new_tokens / (g.prefill_seconds + g.decode_seconds),
                "ms_per_step": 1e3 * g.decode_seconds / max(g.decode_steps, 1),
            }
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "new_tokens_per_s", "ms_per_step"):
            row[key] = row["cache_on"][key]
        if uncached:
            row["cache_speedup"] = row["cache_on"]["decode_tokens_per_s"] / row["cache_off"]["decode_tokens_per_s"]
        out[f"batch{b}"] = row
    # Batch 1 reads every parameter once per step: that sets the floor on step time.
    step_s = out[f"batch{batches[0]}"]["cache_on"]["ms_per_step"] / 1e3
    out["batch1_bandwidth_fraction"] = param_bytes / step_s / bandwidth
    out["ms_per_step_by_context"] = {}
    for ctx in contexts:
        if ctx + 64 > cfg.max_seq_len:
            continue
        g = timed([rng.integers(4, cfg.vocab_size, ctx).tolist()], 64, True, runs=5)  # ~0.2 s a run: more runs
        out["ms_per_step_by_context"][str(ctx)] = 1e3 * g.decode_seconds / max(g.decode_steps, 1)
    return out


def bench_compile(recipe: Recipe, depths=(2, 4, 8, 16), modes=("scan", "unrolled")) -> dict:
    """Seconds from nothing to the first finished train step, scanned and unrolled, per depth.

    With train.compilation_cache set to a directory, compiled steps are read from and written to that
    persistent cache: run twice to see what a restart saves.
    """
    cache = recipe.train.compilation_cache
    if cache not in ("auto", "off"):
        import pathlib

        use_compilation_cache(cache, pathlib.Path("."))
    out = {}
    for depth in depths:
        for scan in [m == "scan" for m in modes]:
            r = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, n_layers=depth, scan_layers=scan))
            start = time.perf_counter()
            layout, model, opt = _setup(r)
            with layout:
                jax.block_until_ready(
                    train_step(model, opt, put_batch(synthetic_batch(r, layout), layout), grad_accum=r.train.grad_accum)
                )
            out[f"{'scan' if scan else 'unrolled'}_{depth}"] = time.perf_counter() - start
    return {"seconds_to_first_step": out}


def bench_memory(recipe: Recipe) -> dict:
    r = bench_train(recipe, steps=1, warmup=1)
    return {
        "peak_bytes_per_device": r["peak_bytes_per_device"],
        "state_bytes_per_device": r["state_bytes_per_device"],
        "mesh": r["mesh"],
    }


# ------------------------------------------------------------------------------------------------
# XLA's own account, where the devices exist


def compile_memory(recipe: Recipe, devices=None) -> dict:
    """AOT-compile the train step on this machine's devices (or `devices`) with abstract inputs (no
    arrays are allocated) and return XLA's memory analysis, in bytes per device."""
    layout = Layout.build(recipe.mesh, devices)
    recipe = recipe.with_batch_for(layout.batch_devices)
    t = recipe.train
    check_divisible(recipe.logical_dims(), layout)
    with layout:

        def make():
            model = Transformer(recipe.model, rngs=nnx.Rngs(0))
            return model, make_optimizer(model, recipe.optimizer, t.steps)

        model, optimizer = nnx.eval_shape(make)
        sharding = batch_sharding(layout)
        shape = (t.batch_size, t.seq_len)
        batch = {
            k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=sharding)
            for k in ("tokens", "targets", "positions", "segment_ids", "weights")
        }
        compiled = train_step.trace(model, optimizer, batch, grad_accum=t.grad_accum).lower().compile()
    a = compiled.memory_analysis()
    return {
        "argument_bytes": int(a.argument_size_in_bytes),
        "output_bytes": int(a.output_size_in_bytes),
        "alias_bytes": int(a.alias_size_in_bytes),
        "temp_bytes": int(a.temp_size_in_bytes),
        "total_bytes": int(
            a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes
        ),
    }


def can_compile(plan: Plan) -> bool:
    """Whether this machine has the plan's devices (fake CPU devices count when the number matches)."""
    local = jax.devices()[0]
    dev = device_for_kind(local.device_kind)
    same_kind = (dev.name if dev else "cpu") == plan.device
    return same_kind and jax.device_count() == plan.n_devices and plan.slices == 1


# ------------------------------------------------------------------------------------------------
# Refitting KEPT and WORKING

# Around this shape, one dimension at a time; each at 2 and 4 layers so that what every layer keeps
# separates from the one layer's working set.
CALIBRATION_BASE = ModelConfig(
    vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512, max_seq_len=256
)
CALIBRATION_VARIANTS = {
    "base": ({}, 128),
    "d_model": ({"d_model": 256}, 128),
    "d_ff": ({"d_ff": 1024}, 128),
    "heads": ({"n_heads": 8, "n_kv_heads": 8}, 128),
    "kv_heads": ({"n_kv_heads": 2}, 128),
    "seq_len": ({}, 256),
}


def fit_activation_terms(remat: str, rows: tuple[int, int] = (4, 8)) -> tuple[tuple, tuple, float]:
    """Refit (KEPT[remat], WORKING[remat]) on one float32 CPU device: the slope of XLA's temp bytes
    in the batch, per token, as non-negative least squares over the variants. Returns the two
    coefficient tuples and the largest relative error of the fit. Takes ~24 compiles (minutes)."""
    from scipy.optimize import nnls  # calibration only: scipy is not a dependency of training

    features, targets = [], []
    for overrides, seq_len in CALIBRATION_VARIANTS.values():
        for layers in (2, 4):
            cfg = dataclasses.replace(CALIBRATION_BASE, **overrides, n_layers=layers, remat=remat, dtype="float32")
            temp = []
            for r in rows:
                recipe = Recipe(model=cfg, mesh=MeshConfig(fsdp=1), train=TrainConfig(batch_size=r, seq_len=seq_len))
                temp.append(compile_memory(recipe, devices=jax.devices()[:1])["temp_bytes"])
            per_token = (temp[1] - temp[0]) / (rows[1] - rows[0]) / seq_len / 4
            qkvo = (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.dim_per_head
            x = np.array([1.0, cfg.d_model, qkvo, cfg.d_ff, cfg.n_heads * seq_len])
            features.append(np.concatenate([layers * x, x]))
            targets.append(per_token)
    a, b = np.array(features), np.array(targets)
    coef, _ = nnls(a, b)
    error = float(np.max(np.abs(a @ coef / b - 1)))
    return tuple(np.round(coef[:5], 2).tolist()), tuple(np.round(coef[5:], 2).tolist()), error
