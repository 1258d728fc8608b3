"""`init.from`, resolved once: a Hugging Face folder, a run directory (its latest checkpoint) or a
checkpoint step folder, read into one typed InitSource that the rest of a run shares."""

import dataclasses
import functools
import hashlib
import pathlib

from lm.config import ModelConfig, Recipe
from lm.data.tokenizer import has_hf_tokenizer
from lm.errors import UserError
from lm.hf import config_from_hf
from lm.state.checkpoint import CheckpointMeta, find_checkpoint, read_meta


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a run's starting weights come from, read once: what it is, its model, its tokenizer."""

    path: pathlib.Path
    hf: bool  # a Hugging Face folder; else a checkpoint step of one of our runs
    model: ModelConfig  # its architecture (a run uses it with its own execution options)
    tokenizer: str | None  # the tokenizer files it comes with (a folder or a tokenizer.model)
    step: int | None = None
    folder: pathlib.Path | None = None  # the checkpoints folder
    recipe: Recipe | None = None  # the source run's resolved recipe
    imported_from: str | None = None  # an imported run's Hugging Face folder (launch.convert --hf-in)

    @property
    def weights(self) -> pathlib.Path:
        """The files whose bytes are the base: the HF folder or the checkpoint step folder."""
        return self.path if self.hf else self.folder / str(self.step)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over every weights file's relative name, size and first and last MiB: identifies a
        base of many GB in well under a second (a full hash of an 8B model costs half a minute)."""
        digest = hashlib.sha256()
        for f in sorted(f for f in self.weights.rglob("*") if f.is_file()):
            size = f.stat().st_size
            digest.update(f"{f.relative_to(self.weights).as_posix()}\0{size}\0".encode())
            with open(f, "rb") as fh:
                digest.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(size - (1 << 20))
                    digest.update(fh.read())
        return digest.hexdigest()

    @property
    def hf_folder(self) -> str | None:
        """The Hugging Face folder these exact weights came from (absolute): the folder itself, or
        the one an unchanged import was read from. None for weights that some run has trained."""
        return str(self.path) if self.hf else self.imported_from

    def identity(self) -> dict:
        """What a LoRA checkpoint stores in place of its base: the path and the fingerprint, and the
        Hugging Face folder it came from (a PEFT export's base_model_name_or_path)."""
        found = {"from": str(self.path), "weights": str(self.weights), "fingerprint": self.fingerprint}
        return {**found, "hf_folder": self.hf_folder} if self.hf_folder else found


def adapter_base(meta: CheckpointMeta, recipe: Recipe) -> str | None:
    """A LoRA checkpoint's base as PEFT should find it: the Hugging Face folder it came from, else
    init.from made absolute (a base that one of our runs trained; export it with --hf-out first)."""
    if meta.base and meta.base.get("hf_folder"):
        return meta.base["hf_folder"]
    return str(pathlib.Path(recipe.init.from_).expanduser().absolute()) if recipe.init.from_ else None


def find_source(path: str, key: str = "init.from") -> InitSource:
    """The weights a folder holds: a Hugging Face folder, a run directory (its latest checkpoint) or a
    checkpoint step folder. `key`: the recipe key that named it, for the error messages."""
    p = pathlib.Path(path).expanduser().absolute()
    if not p.exists():
        raise UserError(
            f"{key}={path} does not exist; pass a Hugging Face folder (config.json + *.safetensors), "
            "a run directory or a checkpoint step folder"
        )
    if (p / "config.json").is_file():
        has = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        return InitSource(p, hf=True, model=config_from_hf(p), tokenizer=str(p) if has else None)
    if p.name.isdigit() or p.name == "checkpoints":
        folder, step, run = find_checkpoint(checkpoint=p)
    elif (p / "recipe.json").is_file():
        folder, step, run = find_checkpoint(run_dir=p)
    else:
        raise UserError(
            f"{key}={path} is neither a Hugging Face folder (no config.json) nor a run directory "
            "(no recipe.json) nor a checkpoint step folder"
        )
    meta = read_meta(folder, step, run)
    recipe = meta.run_recipe(run)
    # Our own sentencepiece model, or the Hugging Face tokenizer files an imported or fine-tuned run
    # keeps (a tokenizer.model with its tokenizer_config.json: BOS, special tokens, chat template).
    own = (run / "tokenizer.model").is_file() and not has_hf_tokenizer(run)
    tokenizer = str(run / "tokenizer.model") if own else str(run)
    return InitSource(
        p, hf=False, model=recipe.model, tokenizer=tokenizer, step=step, folder=folder, recipe=recipe,
        imported_from=meta.hf_folder,
    )  # fmt: skip


def resolve_init(recipe: Recipe, overrides: list[str] = ()) -> tuple[Recipe, InitSource | None]:
    """The recipe with its model section read from init.from, and the source (None without init.from).

    The recipe file's own model section (a preset, which launch.plan uses before any download) gives
    way to the source's. A `model.*` override (`--set model.n_layers=3`) that disagrees with the source
    is refused; the execution options (lm.config.EXECUTION) are the recipe's. init.from becomes an
    absolute path, so the run's recipe names its base from whatever folder a later command runs in.
    """
    if not recipe.init.from_:
        return recipe, None
    source = find_source(recipe.init.from_)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        name = key.removeprefix("model.")
        if name == key or name in recipe.model.execution():
            continue
        if getattr(recipe.model, name) != getattr(source.model, name):
            raise UserError(
                f"{key}={getattr(recipe.model, name)!r} conflicts with init.from={recipe.init.from_}, whose model "
                f"has {name}={getattr(source.model, name)!r}; the model comes from init.from, so drop --set {key}"
            )
    init = dataclasses.replace(recipe.init, from_=str(source.path))
    return dataclasses.replace(recipe, model=source.model.with_execution_of(recipe.model), init=init), source


def check_base(base: dict | None, source: InitSource, where: str) -> None:
    """A LoRA checkpoint's adapter belongs to the base it was trained on (`base`, its stored identity):
    refuse init.from when its files are no longer those weights."""
    if base and base.get("fingerprint") != source.fingerprint:
        raise UserError(
            f"{where} holds a LoRA adapter trained on the base {base.get('weights')}, but init.from={source.path} "
            "now holds other weights (a newer checkpoint, or changed files); restore that base"
        )
