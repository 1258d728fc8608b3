"""Pieces of the training loop that need no full run: eval in microbatches, the kept wandb id, the
resume conflicts, and which checkpoint steps count."""

import dataclasses
import os

import numpy as np
import pytest

from lm.config import DataConfig, Recipe, diff_recipes


def test_eval_in_microbatches_gives_the_whole_batch_loss(tiny_cfg):
    import jax
    from flax import nnx

    from lm.config import MeshConfig
    from lm.model import Transformer
    from lm.train.loop import eval_loss
    from sharding.mesh import Layout

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (8, 17)).astype(np.int32)
    segments = np.repeat(np.array([[1] * 10 + [2] * 6]), 8, axis=0).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
        "segment_ids": segments,
        "weights": rng.random((8, 16)).astype(np.float32),  # uneven weights: a plain mean of means would differ
    }
    layout = Layout.build(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with layout:
        model = Transformer(dataclasses.replace(tiny_cfg, dtype="float32"), rngs=nnx.Rngs(0))
        whole = eval_loss(model, [batch], layout, microbatches=1)
        parts = eval_loss(model, [batch], layout, microbatches=4)
    assert parts == pytest.approx(whole, rel=1e-6)


def test_wandb_run_id_is_kept_in_the_run_folder_so_a_restart_continues_the_run(tmp_path, monkeypatch):
    from lm.train.metrics import MetricsLog

    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for _ in range(2):  # a run and its restart
        log = MetricsLog(tmp_path, {"x": 1}, wandb_mode="offline", project="test", enabled=True)
        ids.append(log.wandb.id)
        log.close()
    assert ids[0] == ids[1] == (tmp_path / "wandb_id").read_text().strip()
    runs = [p.name for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run-")]
    # wandb names a restart within the same second <time>-<id>-1; the run id is what continues.
    assert runs and all(ids[0] in name for name in runs)


def test_changing_data_dir_on_resume_is_a_conflict():
    saved = Recipe(data=DataConfig(dir="data/a"))
    safe, conflicts = diff_recipes(saved, dataclasses.replace(saved, data=DataConfig(dir="data/b")))
    assert conflicts == ["data.dir: 'data/a' -> 'data/b'"] and not safe


def test_only_steps_orbax_finished_count_and_set_aside_ones_are_kept(tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from lm.state.checkpoint import finished_steps, kept_steps

    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(3, args=ocp.args.StandardSave({"x": jnp.zeros(2)}))
        manager.wait_until_finished()
    os.mkdir(tmp_path / "6.orbax-checkpoint-tmp-1763960000")  # a save cut short
    os.mkdir(tmp_path / "9.damaged-1763960000")  # set aside
    os.mkdir(tmp_path / "notes")
    assert finished_steps(tmp_path) == [3]
    assert kept_steps(tmp_path) == [3, 9]
    assert finished_steps(tmp_path / "missing") == []


def test_a_params_only_import_is_refused_for_resuming_and_left_in_place(tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from lm.config import CheckpointConfig
    from lm.errors import UserError
    from lm.state.checkpoint import Checkpointer, finished_steps

    args = ocp.args.Composite(model=ocp.args.StandardSave({"x": jnp.zeros(2)}), meta=ocp.args.JsonSave({}))
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(0, args=args)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    with pytest.raises(UserError, match="holds parameters only"):
        ckpt.restore_latest(model=None, optimizer=None, data_iter=None)
    ckpt.close()
    assert finished_steps(tmp_path) == [0]
