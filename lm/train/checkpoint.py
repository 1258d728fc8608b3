"""Orbax checkpoints of the whole training state: model, optimizer, data iterator, step, recipe
and tokenizer (in `meta`, so a checkpoint folder is enough to generate from).

Restores go onto the *current* model's shardings (built for the current mesh), so a checkpoint
saved on one mesh restores onto another without a full copy on any device (flax #5110).
Orbax writes each step into a temporary folder and renames it when complete, so an interrupted
save never looks like a checkpoint.
"""

import errno
import json
import logging
import pathlib
import time

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from lm.errors import UserError
from lm.recipe import CheckpointConfig

log = logging.getLogger(__name__)


def saved_params(model):
    """What a checkpoint holds of the model: every Param, or for a LoRA run only the adapters (the
    frozen base is named by its path and fingerprint in `meta` instead, see lm.train.init)."""
    return nnx.LoRAParam if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)) else nnx.Param


def _abstract(state):
    """ShapeDtypeStructs carrying the live arrays' shardings: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        # gs:// (TPU pods) goes through etils' epath, which orbax uses; local paths stay pathlib.
        self.directory = epath.Path(directory) if "://" in str(directory) else pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, keep_period=cfg.keep_period, enable_async_checkpointing=cfg.async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, data_iter, meta: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model, saved_params(model))),
            optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        )
        with _disk_errors(self.directory, step):
            return self.manager.save(step, args=args, force=force)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, model, optimizer, data_iter, check_meta=None) -> int:
        """Restore the newest readable checkpoint and return its step (0: none).

        An unreadable one (a truncated file, a half-copied folder) is reported and skipped in favour
        of the one before. `check_meta(step, meta)` may raise UserError to refuse a checkpoint that
        belongs to another run; that is not skipped.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                meta = self.meta(step)
                if check_meta is not None:
                    check_meta(step, meta)
                self.restore(step, model, optimizer, data_iter)
                return step
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means 'unreadable'
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", step, _first_line(e))
                self._set_aside(step)
        if steps:
            raise UserError(
                f"no readable checkpoint in {self.directory} (steps {steps} all failed to load); "
                "move the folder away to start over"
            )
        return 0

    def restore(self, step: int, model, optimizer, data_iter) -> dict:
        """Load `step` into model, optimizer and data_iter in place; return the saved meta.

        grain saves one data-iterator state per process. Each is the number of global batches
        consumed (lm.data.pipeline), so when another number of processes saved this step, any of
        their states continues the same global batch sequence on this process count.
        """
        model_state, opt_state = nnx.state(model, saved_params(model)), nnx.state(optimizer)
        data_dir = self.directory / str(step) / "data"
        own = (data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists()
        items = dict(
            model=ocp.args.StandardRestore(_abstract(model_state)),
            optimizer=ocp.args.StandardRestore(_abstract(opt_state)),
            meta=ocp.args.JsonRestore(),
        )
        if own:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if not own:
            saved = sorted(data_dir.glob("process_*-of-*.json"))
            if not saved:
                raise FileNotFoundError(f"{data_dir} holds no data-iterator state")
            data_iter.set_state(json.loads(saved[0].read_text()))
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        return restored["meta"]

    def _set_aside(self, step: int) -> None:
        """Rename an unreadable step folder so that orbax stops counting it (a later save of that
        step would otherwise be refused as already existing). Nothing is deleted."""
        if jax.process_index() == 0:
            folder = self.directory / str(step)
            folder.rename(self.directory / f"{step}.unreadable-{int(time.time())}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()

    def restore_params(self, step: int, model) -> None:
        """Load only the parameters (generation and export need nothing else)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(_abstract(nnx.state(model, saved_params(model))))
            ),
        )
        nnx.update(model, restored["model"])

    def save_params(self, step: int, model, meta: dict) -> None:
        """A weights-only checkpoint (an imported model): `model` and `meta` items, no optimizer or
        data state. restore_params and meta read it like any other step."""
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model, nnx.Param)), meta=ocp.args.JsonSave({**meta, "step": step})
        )
        with _disk_errors(self.directory, step):
            self.manager.save(step, args=args, force=True)
            self.manager.wait_until_finished()

    def wait(self) -> None:
        with _disk_errors(self.directory, self.manager.latest_step()):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def has_checkpoints(directory) -> bool:
    """Whether a finished step folder exists (without creating anything, unlike a manager)."""
    path = epath.Path(str(directory))
    return path.exists() and any(p.name.isdigit() for p in path.iterdir())


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


class _disk_errors:
    """Turn a full disk or a permission problem during a save into a one-line UserError."""

    def __init__(self, directory, step):
        self.directory, self.step = directory, step

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise UserError(
                f"cannot write checkpoint {self.step} to {self.directory}: {e.strerror}; free space or fix "
                "permissions and rerun (earlier checkpoints are intact)"
            ) from None
        return False


def find_checkpoint(run_dir=None, checkpoint=None) -> tuple[pathlib.Path, int, pathlib.Path]:
    """(checkpoints folder, step, run folder) for --run-dir (latest step) or --checkpoint (a step
    folder such as runs/x/checkpoints/300, or a checkpoints folder: its latest step)."""
    if checkpoint is not None:
        path = pathlib.Path(checkpoint).absolute()
        if not path.is_dir():
            raise UserError(f"checkpoint {checkpoint} does not exist; pass a run's checkpoints/<step> folder")
        if path.name.isdigit():
            return path.parent, int(path.name), path.parent.parent
        run_dir = path.parent if path.name == "checkpoints" else path
    path = pathlib.Path(run_dir).absolute()
    if not (path / "recipe.json").is_file():
        raise UserError(
            f"{run_dir} is not a run directory (no recipe.json); pass the --run-dir that launch.train wrote"
        )
    try:
        configured = json.loads((path / "recipe.json").read_text()).get("checkpoint", {}).get("dir")
    except json.JSONDecodeError:
        raise UserError(f"{path / 'recipe.json'} is not valid JSON; restore it from a checkpoint's meta") from None
    folder = (
        epath.Path(configured)
        if configured and "://" in configured
        else pathlib.Path(configured or path / "checkpoints")
    )
    if not folder.is_dir():
        raise UserError(f"{run_dir} has no checkpoints folder ({folder}); train it for at least checkpoint.every steps")
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    if not steps:
        raise UserError(f"{folder} holds no finished checkpoint; train longer than checkpoint.every steps")
    return folder, steps[-1], path
