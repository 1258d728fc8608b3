"""Orbax checkpoints of the whole training state: model, optimizer, data iterator, step, recipe
and tokenizer (in `meta`, so a checkpoint folder is enough to generate from).

Restores go onto the *current* model's shardings (built for the current mesh), so a checkpoint
saved on one mesh restores onto another without a full copy on any device (flax #5110).

A step counts only once orbax has finished it: on a local disk it writes into a temporary folder
and renames it, on gs:// it writes a commit file last. `finished_steps` asks orbax which steps are
finished, and every reader (training, generate, convert, score) goes through it, so an interrupted
save never looks like a checkpoint anywhere.

Nothing is lost to a fault: a checkpoint is set aside (renamed, never deleted) only on positive
evidence that it is damaged (`damage`); any other failure to restore stops the run with every step
folder in place.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import pathlib
import sys
import threading
import time
import traceback

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from lm.config import CheckpointConfig, Recipe
from lm.errors import UserError
from lm.state.agree import agreed, first_error

log = logging.getLogger(__name__)

ITEMS = ("model", "optimizer", "data", "meta")  # what every step folder holds
ARRAY_ITEMS = ("model", "optimizer")  # OCDBT array stores
# tensorstore status codes that mean "the stored bytes are not what was written": positive evidence
# of damage. Anything else (RESOURCE_EXHAUSTED, UNAVAILABLE, PERMISSION_DENIED, ...) is the
# machine's or the storage's problem, not the checkpoint's.
DAMAGE_CODES = ("OUT_OF_RANGE", "NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION")


def as_path(directory):
    """gs:// (TPU pods) goes through etils' epath, which orbax uses; local paths stay pathlib."""
    return epath.Path(str(directory)) if "://" in str(directory) else pathlib.Path(directory).absolute()


def finished_steps(directory) -> list[int]:
    """The steps orbax has finished in `directory` (ascending), by orbax's own test: a renamed
    folder locally, a commit file on gs://. Temporary, unfinished and set-aside folders do not count."""
    path = epath.Path(str(directory))
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in ocp.utils.checkpoint_steps_paths(path) if p.name.isdigit())


def has_checkpoints(directory) -> bool:
    """Whether a finished step exists (without creating anything, unlike a manager)."""
    return bool(finished_steps(directory))


def kept_steps(directory) -> list[int]:
    """Every step that still exists in some form: finished, or set aside as damaged (`N.damaged-*`).
    Orbax's temporary folders of interrupted saves do not count: those steps never finished."""
    path = epath.Path(str(directory))
    if not path.is_dir():
        return []
    steps = set(finished_steps(path))
    for p in path.iterdir():
        head, _, rest = p.name.partition(".")
        if head.isdigit() and rest and "orbax-checkpoint-tmp" not in rest:
            steps.add(int(head))
    return sorted(steps)


def damage(step_dir) -> str | None:
    """What is damaged in a finished step folder, or None when every file is there and readable.

    Positive evidence only: a missing item or file, metadata that does not parse, or array bytes
    that cannot be read back (a truncated or missing data file). Reading every stored chunk costs a
    pass over the checkpoint, which is why this runs only after a restore has failed."""
    step_dir = epath.Path(str(step_dir))
    if not step_dir.is_dir():
        return f"{step_dir} is missing"
    for name in ("_CHECKPOINT_METADATA", *(f"{item}/_METADATA" for item in ARRAY_ITEMS), "meta/metadata"):
        file = step_dir / name
        if not file.exists():
            return f"{name} is missing"
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError):
            return f"{name} does not parse as JSON"
    data = step_dir / "data"
    states = list(data.glob("process_*-of-*.json")) if data.is_dir() else []
    if not states:
        return "data/ holds no data-iterator state"
    for file in states:
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError):
            return f"data/{file.name} does not parse as JSON"
    for item in ARRAY_ITEMS:
        found = _unreadable_arrays(step_dir / item)
        if found:
            return f"{item}: {found}"
    return None


def _unreadable_arrays(item_dir: epath.Path) -> str | None:
    """Read every key of an item's OCDBT store; name the first that is damaged (see DAMAGE_CODES).
    Other errors (no memory, storage unavailable) are raised: they say nothing about the files."""
    import tensorstore as ts

    if not (item_dir / "manifest.ocdbt").exists():
        return "manifest.ocdbt is missing"
    base = str(item_dir) if "://" in str(item_dir) else f"file://{item_dir}"
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": base.rstrip("/") + "/"}).result()
        for key in store.list().result():
            value = store.read(key).result().value
            # A chunk is compressed, so never empty; tensorstore reads a missing data file as no bytes.
            if not value and not key.decode(errors="replace").rsplit("/", 1)[-1].startswith((".z", "zarr.json")):
                return f"chunk {key.decode(errors='replace')} reads back empty (its data file is missing)"
    except ValueError as e:
        code = str(e).split(":")[0].strip()
        if code in DAMAGE_CODES:
            return _first_line(str(e))
        raise
    return None


def check_writable(directory) -> None:
    """Create the checkpoint folder and write a probe file, so an unwritable folder (a file in the
    way, a read-only mount, no permission) stops the run before the first step, not in orbax's
    background thread at the first save."""
    path = as_path(directory)
    if path.exists() and not path.is_dir():
        raise UserError(f"checkpoint.dir {directory} is a file, not a folder; set checkpoint.dir to a folder")
    probe = path / f".write-probe-{jax.process_index()}"
    # Folders made only for the probe are removed again, so bad input leaves no trace (one process
    # only: with several, another may be probing in the same folder).
    alone = isinstance(path, pathlib.Path) and jax.process_count() == 1
    created = [p for p in [path, *path.parents] if not p.exists()] if alone else []
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("nnx-lm")
        probe.unlink()
    except OSError as e:
        cause = e.strerror or type(e).__name__
        raise UserError(
            f"checkpoint.dir {directory} is not writable ({cause}); set checkpoint.dir to a writable folder"
        ) from None
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass  # another process's probe is still in it, or it was never made


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself (its `meta` item): written and read only through the
    Checkpointer, so every reader sees the same fields.

    recipe: the run's resolved recipe (Recipe.to_dict), so a checkpoint folder alone can be loaded.
    tokenizer_sha256: the training tokenizer's identity; tokenizer_model: our sentencepiece model in
    base64, so a copied checkpoint still decodes. base: a LoRA run's base, by path and fingerprint,
    in place of its weights. hf_folder: the Hugging Face folder an imported checkpoint came from.
    run_id, run_dir: the run that owns this checkpoint (lm.train.run.run_id), so that another run
    pointed at the same checkpoint.dir is refused instead of resuming, and later deleting, its steps.
    """

    recipe: dict | None = None
    run_id: str | None = None
    run_dir: str | None = None
    seed: int = 0
    tokenizer_sha256: str | None = None
    tokenizer_model: str | None = None
    base: dict | None = None
    hf_folder: str | None = None
    step: int | None = None

    def to_json(self, step: int) -> dict:
        return {k: v for k, v in {**dataclasses.asdict(self), "step": step}.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "CheckpointMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def run_recipe(self, run: pathlib.Path) -> Recipe:
        """The recipe this checkpoint was trained with (older checkpoints: the run folder's copy)."""
        return Recipe.from_dict(self.recipe or json.loads((run / "recipe.json").read_text()))


def read_meta(folder, step: int, run: pathlib.Path) -> CheckpointMeta:
    """A finished step's meta, read without restoring any array."""
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False))
    try:
        return ckpt.meta(step)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign folder
        raise UserError(
            f"checkpoint {step} in {folder} is unreadable ({type(e).__name__}); pass an earlier one with --checkpoint"
        ) from None
    finally:
        ckpt.close()


def peek_meta(folder, step: int) -> CheckpointMeta | None:
    """A finished step's meta read straight from its JSON file, by this process alone (a manager's
    start is a collective that every process must join), or None where it does not parse."""
    try:
        return CheckpointMeta.from_json(json.loads((as_path(folder) / str(step) / "meta" / "metadata").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _surfaced_by_us(record: logging.LogRecord) -> bool:
    """Orbax logs a background save's failure with its whole traceback; `_save_errors` raises it as
    one line instead, so that is what the user sees."""
    return not (record.levelno >= logging.ERROR and "/orbax/" in record.pathname)


def saved_params(model):
    """What a checkpoint holds of the model: every Param, or for a LoRA run only the adapters (the
    frozen base is named by its path and fingerprint in `meta` instead, see lm.state.source)."""
    return nnx.LoRAParam if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)) else nnx.Param


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, keep_period=cfg.keep_period, enable_async_checkpointing=cfg.async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.saving: int | None = None  # the step whose save may still be running
        self.failed = False  # a save failed and was reported
        self.quiet = None  # while a save runs: the context that drops orbax's background copies of an error

    def latest_step(self) -> int | None:
        """The newest finished step, from the manager's cache of the same orbax test (no listing of
        a gs:// bucket at every log step)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return finished_steps(self.directory)

    def save(self, step: int, model, optimizer, data_iter, meta: CheckpointMeta, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model, saved_params(model))),
            optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta.to_json(step)),
        )
        self._quiet_background()
        with _save_errors(self, self.saving or step):
            saved = self.manager.save(step, args=args, force=force)
        if saved:
            self.saving = step
        return saved

    def check(self) -> None:
        """Raise (as one line) an error from a save still running in the background, if it has failed."""
        if self.saving is not None:
            with _save_errors(self, self.saving):
                self.manager.check_for_errors()

    def wait(self) -> None:
        with _save_errors(self, self.saving):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        self._unquiet()

    def _quiet_background(self) -> None:
        """Until this save is waited for: drop orbax's own background copies of a save's failure
        (`_quiet_orbax_background`), which `_save_errors` reports as one line instead."""
        if self.quiet is None:
            self.quiet = _quiet_orbax_background()
            self.quiet.__enter__()

    def _unquiet(self) -> None:
        if self.quiet is not None:
            self.quiet, quiet = None, self.quiet
            quiet.__exit__(None, None, None)

    def meta(self, step: int) -> CheckpointMeta:
        return CheckpointMeta.from_json(
            self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        )

    def restore_latest(self, model, optimizer, data_iter, check_meta=None) -> int:
        """Restore the newest finished checkpoint and return its step (0: none).

        A damaged one (see `damage`) is set aside and the one before is tried. Any other failure
        (out of memory, storage errors, a mesh that does not fit, an interruption) is a UserError
        with every checkpoint left where it was. `check_meta(step, meta)` may raise UserError to
        refuse a checkpoint that belongs to another run. Every process takes each decision together.
        """
        for step in reversed(self.all_steps()):
            agreed(_training_state, self.directory / str(step))
            meta, error = _attempt(self.meta, step, quiet=self._quiet_background)
            if error is None:
                if check_meta is not None:
                    agreed(check_meta, step, meta)
                _, error = _attempt(self.restore, step, model, optimizer, data_iter, quiet=self._quiet_background)
            if error is None:
                return step
            found = first_error(agreed(self._inspect, step, only_first=True))  # process 0 looks, all hear
            if found is None:
                raise UserError(
                    f"could not restore checkpoint {step} from {self.directory} ({error}); its files are all "
                    "present and readable, so every checkpoint was left in place: fix the cause (memory, "
                    "storage, mesh) and rerun the same command to resume"
                )
            aside = self._set_aside(step)
            log.warning("checkpoint %s is damaged (%s); set aside as %s; trying the previous one", step, found, aside)
        return 0

    def _inspect(self, step: int) -> str | None:
        try:
            return damage(self.directory / str(step))
        except Exception as e:  # noqa: BLE001 - could not even look: not evidence of damage
            raise UserError(
                f"could not restore checkpoint {step} from {self.directory}, nor read it back to check it "
                f"({_first_line(f'{type(e).__name__}: {e}')}); every checkpoint was left in place: rerun when "
                "the storage is reachable"
            ) from None

    def restore(self, step: int, model, optimizer, data_iter) -> CheckpointMeta:
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
        return CheckpointMeta.from_json(restored["meta"])

    def _set_aside(self, step: int) -> str:
        """Rename a damaged step folder so that orbax stops counting it (a later save of that step
        would otherwise be refused as already existing). Nothing is deleted."""
        name = f"{step}.damaged-{int(time.time())}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(self.directory / name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()
        return name

    def restore_params(self, step: int, model) -> None:
        """Load only the parameters (generation and export need nothing else)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(nnx.state(model, saved_params(model))))),
        )
        nnx.update(model, restored["model"])

    def save_params(self, step: int, model, meta: CheckpointMeta) -> None:
        """A weights-only checkpoint (an imported model): `model` and `meta` items, no optimizer or
        data state. restore_params and meta read it like any other step."""
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model, nnx.Param)), meta=ocp.args.JsonSave(meta.to_json(step))
        )
        self._quiet_background()
        with _save_errors(self, step):
            self.manager.save(step, args=args, force=True)
        self.saving = step
        self.wait()

    def close(self) -> None:
        """Wait for a save in flight and release orbax's threads. A save failure already reported
        is not raised twice."""
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 - re-raised below as one line unless this failure was already reported
            if not self.failed:
                with _save_errors(self, self.saving):
                    raise
        finally:
            if not self.failed:  # a failure's error is on its way to the user; orbax's copies stay dropped
                self._unquiet()


def _training_state(step_dir) -> None:
    """Refuse to resume from a step that holds parameters only (launch.convert's import): it is
    not damaged, it is not a training run."""
    if not any((step_dir / item).exists() for item in ("optimizer", "data")):
        raise UserError(
            f"checkpoint {step_dir} holds parameters only (an import, not a training run); start a new "
            f"--run-dir from it with --set init.from={step_dir}"
        )


def _abstract(state):
    """ShapeDtypeStructs carrying the live arrays' shardings: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _attempt(fn, *args, quiet):
    """(fn's result, None), or (None, a one-line reason) when it fails, agreed by every process: a
    failure on any one is a failure everywhere. Interruption counts as a failure, not as damage."""
    result, error = None, None
    try:
        result = fn(*args)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:  # noqa: BLE001 - what failed is decided by inspecting the files, not the exception
        error = _root_cause(e)
        quiet()  # orbax's abandoned reads print tracebacks when they are collected; only theirs are dropped
    return result, first_error(error)


def _root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost exception: orbax wraps tensorstore's precise status
    (RESOURCE_EXHAUSTED: ..., NOT_FOUND: ...) in a generic one."""
    while e.__cause__ is not None:
        e = e.__cause__
    return _first_line(f"{type(e).__name__}: {e}")


def _quiet_orbax_coroutines(previous):
    """After a failed restore, orbax's abandoned read coroutines and event loops print tracebacks
    when they are garbage collected; the one-line error already says what happened."""

    def hook(unraisable):
        where = f"{unraisable.object!r} {getattr(getattr(unraisable.object, 'cr_code', None), 'co_filename', '')}"
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        if not any(name in text for name in ("orbax", "asyncio") for text in [where, *(f.filename for f in frames)]):
            previous(unraisable)

    return hook


def _asyncio_from_orbax(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or "orbax" not in record.getMessage()


@contextlib.contextmanager
def _quiet_orbax_background():
    """Orbax's background writer reports a failed save itself, with tracebacks, through absl and
    asyncio logging, the thread hook, the unraisable hook and (from tensorstore's callbacks)
    sys.excepthook, often while training goes on. `_save_errors` raises that failure as one line,
    so while a save runs those copies are dropped; errors from anywhere else pass through."""

    def from_orbax(tb) -> bool:
        frames = traceback.extract_tb(tb) if tb else []
        return any("orbax" in f.filename for f in frames)

    absl_log, asyncio_log = logging.getLogger("absl"), logging.getLogger("asyncio")
    hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
    absl_log.addFilter(_surfaced_by_us)
    asyncio_log.addFilter(_asyncio_from_orbax)
    threading.excepthook = lambda args: None if from_orbax(args.exc_traceback) else hooks[0](args)
    sys.excepthook = lambda kind, value, tb: None if from_orbax(tb) else hooks[1](kind, value, tb)
    sys.unraisablehook = _quiet_orbax_coroutines(hooks[2])
    try:
        yield
    finally:
        threading.excepthook, sys.excepthook, sys.unraisablehook = hooks
        absl_log.removeFilter(_surfaced_by_us)
        asyncio_log.removeFilter(_asyncio_from_orbax)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _cause(e: BaseException) -> str:
    """The root cause of a save failure in a few words: the OS error if there is one."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e)
    for errno_name, strerror in (
        (errno.ENOSPC, "No space left on device"),
        (errno.EDQUOT, "Disk quota exceeded"),
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
    ):
        if strerror in text or f"os_error_code='{errno_name}'" in text:
            return strerror
    return _first_line(f"{type(e).__name__}: {text}")


class _save_errors:
    """Turn any failure of a save (a full disk, a permission problem, a storage error), raised now
    or by orbax's background thread, into one line naming the folder and the cause."""

    def __init__(self, ckpt: "Checkpointer", step: int | None):
        self.ckpt, self.step = ckpt, step

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, UserError) or not isinstance(e, Exception):
            return False
        self.ckpt.failed = True
        which = f"checkpoint {self.step}" if self.step is not None else "a checkpoint"
        raise UserError(
            f"cannot save {which} to {self.ckpt.directory}: {_cause(e)}; free space or fix the folder and rerun "
            "(earlier checkpoints are intact)"
        ) from None


def find_checkpoint(run_dir=None, checkpoint=None) -> tuple[pathlib.Path, int, pathlib.Path]:
    """(checkpoints folder, step, run folder) for --run-dir (latest finished step) or --checkpoint (a
    step folder such as runs/x/checkpoints/300, or a checkpoints folder: its latest finished step).
    Every reader of checkpoints (generate, convert, score) finds them here, through finished_steps."""
    if checkpoint is not None:
        path = as_path(checkpoint)
        if not path.is_dir():
            raise UserError(f"checkpoint {checkpoint} does not exist; pass a run's checkpoints/<step> folder")
        head = path.name.split(".")[0]
        if head.isdigit() and head != path.name:
            raise UserError(
                f"checkpoint {checkpoint} is not a finished step (an interrupted save or a set-aside copy); "
                f"pass one of {finished_steps(path.parent) or 'the finished steps'} in {path.parent}"
            )
        if path.name.isdigit():
            if int(path.name) not in finished_steps(path.parent):
                raise UserError(
                    f"checkpoint {checkpoint} is not finished (orbax never committed it); pass one of "
                    f"{finished_steps(path.parent) or 'the finished steps'} in {path.parent}"
                )
            return path.parent, int(path.name), path.parent.parent
        run_dir = path.parent if path.name == "checkpoints" else path
    path = as_path(run_dir)
    if not (path / "recipe.json").is_file():
        raise UserError(
            f"{run_dir} is not a run directory (no recipe.json); pass the --run-dir that launch.train wrote"
        )
    try:
        configured = json.loads((path / "recipe.json").read_text()).get("checkpoint", {}).get("dir")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{path / 'recipe.json'} is not valid JSON; restore it from a checkpoint's meta") from None
    folder = as_path(configured) if configured else path / "checkpoints"
    if not folder.is_dir():
        raise UserError(f"{run_dir} has no checkpoints folder ({folder}); train it for at least checkpoint.every steps")
    steps = finished_steps(folder)
    if not steps:
        raise UserError(f"{folder} holds no finished checkpoint; train longer than checkpoint.every steps")
    return folder, steps[-1], path
