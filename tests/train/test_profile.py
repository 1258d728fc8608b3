"""Profiling and the persistent compilation cache: traces are written and summarised, caches filled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig, load_recipe
from lm.errors import UserError
from lm.model import Transformer
from lm.state.optimizer import make_optimizer
from lm.train.compile_cache import use_compilation_cache
from lm.train.profile import StepProfiler, summarize
from lm.train.step import train_step


def test_profiled_train_steps_are_summarised_by_op_class(tmp_path):
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128, max_seq_len=32)
    recipe = load_recipe("stdlib_tiny", ["train.steps=10"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = make_optimizer(model, recipe.optimizer, 10)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 33)), jnp.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(32), (2, 32)),
        "segment_ids": jnp.ones((2, 32), jnp.int32),
        "weights": jnp.ones((2, 32), jnp.float32),
    }
    hlo = train_step.lower(model, opt, batch).compile().as_text()
    profiler = StepProfiler((2, 3), tmp_path / "profile")
    for step in range(1, 5):
        profiler.before(step)
        out = train_step(model, opt, batch)
        profiler.after(step, out)
    assert not profiler.active
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    summary = summarize(tmp_path / "profile", hlo, steps=2)
    classes = summary["ms_per_step_by_class"]
    for name in ("matmul forward", "matmul backward", "optimizer"):
        assert classes.get(name, 0) > 0, classes
    assert summary["ms_per_step_total"] == pytest.approx(sum(classes.values()), abs=0.5)


@pytest.mark.parametrize("bad", ["3", "5:2", "0:1", "a:b"])
def test_bad_profile_steps_are_user_errors(bad):
    with pytest.raises(UserError, match="profile_steps"):
        load_recipe("stdlib_tiny", [f"train.profile_steps={bad}"])
    assert load_recipe("stdlib_tiny", ["train.profile_steps=3:4"]).train.profile_range == (3, 4)


def test_compilation_cache_stores_compiled_programs(tmp_path):
    from jax.experimental.compilation_cache import compilation_cache

    try:
        path = use_compilation_cache("auto", tmp_path)
        assert path == tmp_path / "compile_cache"
        before = set(path.iterdir())
        jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())(jnp.arange(17.0)).block_until_ready()
        assert set(path.iterdir()) - before
        assert use_compilation_cache("off", tmp_path) is None
    finally:  # later tests in this process compile without a persistent cache again
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", None)
