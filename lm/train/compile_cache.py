"""The persistent XLA compilation cache: a restarted or resumed run skips recompiling its steps."""

import pathlib

import jax
from jax.experimental.compilation_cache import compilation_cache


def use_compilation_cache(setting: str, run_dir: pathlib.Path) -> pathlib.Path | None:
    """Point jax's persistent cache at `setting` ("auto": <run_dir>/compile_cache, "off": none).

    Every compiled program is kept, however quick its compilation: on a restart the train step,
    eval step and decode loop all come from the cache. Returns the directory in use.
    """
    if setting == "off":
        return None
    path = (run_dir / "compile_cache") if setting == "auto" else pathlib.Path(setting)
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        compilation_cache.reset_cache()  # the cache binds its directory on first use in a process
        jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
