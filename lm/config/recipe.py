"""Typed recipes: nested frozen dataclasses, dotted `--set key=value` overrides, JSON round trip."""

import dataclasses
import difflib
import importlib
import importlib.util
import json
import math
import pathlib
import re
import types
import typing
from typing import Any, Literal

from lm.config.model import EXECUTION, STORED, ModelConfig
from lm.errors import UserError
from sharding.mesh import AXES
from sharding.rules import DEFAULT_RULES


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(key: str, value, ok: bool, how: str) -> None:
    """The one-line range error every recipe value gets: the key, the value, what it must be."""
    if not ok:
        raise UserError(f"{key}={value!r} {how}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. One of data/fsdp/context/tensor/expert may be -1: it takes whatever devices are left.
    context > 1 splits each sequence over that many devices (context parallelism, model.context_parallel).
    expert: expert parallelism (an MoE layer's experts split over it; its devices also split the batch).
    dcn_* > 1 make a multi-slice mesh: those axes span slices over the data-centre network."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1
    expert: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    rules: tuple[tuple[str, Any], ...] = ()  # overrides of sharding.rules.DEFAULT_RULES

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor", "context", "expert"):
            _check(
                f"mesh.{name}",
                getattr(self, name),
                getattr(self, name) == -1 or getattr(self, name) >= 1,
                "must be at least 1, or -1 for the devices left over",
            )
        fills = [n for n in ("data", "fsdp", "tensor", "context", "expert") if getattr(self, n) == -1]
        if len(fills) > 1:
            raise UserError(
                f"mesh.{' and mesh.'.join(fills)} are all -1; at most one axis may take the devices left over"
            )
        for name in ("dcn_data", "dcn_fsdp"):
            _check(f"mesh.{name}", getattr(self, name), getattr(self, name) >= 1, "must be at least 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    inputs: tuple[str, ...] = ()  # paths or globs; empty: the embedded stdlib corpus
    text_field: str = "text"
    tokenizer: str | None = None  # an existing sentencepiece .model; None: train one
    eval_fraction: float = 0.02
    dir: str | None = None  # prepared data; None: <run_dir>/data
    # auto: per jsonl line, `messages` -> chat, `prompt`/`completion` -> completion, else text.
    # completion and chat train only on the completion / assistant tokens (lm.data.instruct).
    format: Literal["auto", "text", "completion", "chat"] = "auto"

    def __post_init__(self):
        _check(
            "data.eval_fraction",
            self.eval_fraction,
            0 < self.eval_fraction < 1,
            "must be between 0 and 1 (exclusive), e.g. 0.02",
        )
        _check("data.text_field", self.text_field, bool(self.text_field), "must name a JSON field, e.g. text")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (lm.lora). rank 0 is a full fine-tune: every parameter trains."""

    rank: int = 0
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank (as in PEFT)
    targets: str = r".*(attn\.(query|key|value|out)|mlp\.(gate|up|down))"  # regex over module paths
    dropout: float = 0.0  # on the adapter's input, in training only (PEFT's lora_dropout)
    base_dtype: Literal["float32", "bfloat16", "int8", "nf4"] = "bfloat16"  # the frozen base; int8/nf4: QLoRA

    def __post_init__(self):
        if self.rank < 0:
            raise UserError(f"lora.rank={self.rank} must be >= 0 (0 means a full fine-tune)")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha={self.alpha} must be positive; 2 x lora.rank is a common choice")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout={self.dropout} must be in [0, 1)")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise UserError(f"lora.targets={self.targets!r} is not a valid regular expression ({e})") from None
        if self.base_dtype not in typing.get_args(LoraConfig.__annotations__["base_dtype"]):
            raise UserError(f"lora.base_dtype={self.base_dtype!r} is not one of float32, bfloat16, int8, nf4")

    @property
    def scale(self) -> float:
        """The adapter's output scale alpha / rank (PEFT's `scaling`)."""
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the starting weights come from (the key is `init.from`; `from` is a Python keyword).

    A Hugging Face folder, a run directory (its latest checkpoint) or a checkpoint step folder. The
    model section then comes from that source and the optimizer starts fresh."""

    from_: str | None = dataclasses.field(default=None, metadata={"key": "from"})
    required: bool = False  # a fine-tuning recipe: training refuses to start without init.from


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global-norm clipping; none turns it off

    def __post_init__(self):
        _check("optimizer.lr", self.lr, _finite(self.lr) and self.lr > 0, "must be a positive number, e.g. 3e-4")
        _check(
            "optimizer.min_lr_ratio",
            self.min_lr_ratio,
            0 <= self.min_lr_ratio <= 1,
            "must be in [0, 1] (the final learning rate as a fraction of optimizer.lr)",
        )
        _check("optimizer.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "must be >= 0")
        _check(
            "optimizer.weight_decay",
            self.weight_decay,
            0 <= self.weight_decay <= 1,
            "must be in [0, 1] (decoupled AdamW decay, e.g. 0.1)",
        )
        for name in ("b1", "b2"):
            _check(
                f"optimizer.{name}",
                getattr(self, name),
                0 <= getattr(self, name) < 1,
                "must be in [0, 1), e.g. b1=0.9, b2=0.95",
            )
        _check("optimizer.eps", self.eps, _finite(self.eps) and self.eps > 0, "must be positive, e.g. 1e-8")
        _check(
            "optimizer.grad_clip",
            self.grad_clip,
            self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0),
            "must be positive, or none to turn clipping off",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global, in sequences, per optimizer step
    per_device_batch_size: int = 0  # > 0: batch_size = this x (data x fsdp devices), resolved at start
    seq_len: int = 256
    grad_accum: int = 1  # microbatches per step (inside the jitted step)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    sample_prompt: str = "def "
    sample_tokens: int = 96
    peak_tflops: float | None = None  # per device, for MFU; None: looked up from the device kind
    max_bad_steps: int = 0  # consecutive non-finite steps to skip (update dropped) before stopping
    profile_steps: str = ""  # "a:b": a jax.profiler trace of steps a..b in <run_dir>/profile
    compilation_cache: str = "auto"  # persistent XLA cache dir; auto: <run_dir>/compile_cache; off: none
    # lm-evaluation-harness tasks on the live model (lm.evals; needs the `eval` extra), scored into
    # metrics.jsonl as eval/<task>/<metric> every eval_tasks_every steps (0: at eval_every) and at the end.
    eval_tasks: tuple[str, ...] = ()
    eval_tasks_every: int = 0
    eval_tasks_limit: float | None = None  # documents per task (a fraction if < 1); None: all
    eval_include_path: str | None = None  # a folder of task YAMLs of your own
    # sft: next-token loss on the data; dpo: preference pairs; grpo: sampled completions scored by rewards.
    # dpo and grpo read the `objective` section (lm.train.objectives).
    objective: Literal["sft", "dpo", "grpo"] = "sft"

    def __post_init__(self):
        _check("train.objective", self.objective, self.objective in ("sft", "dpo", "grpo"), "must be sft, dpo or grpo")
        _check("train.eval_tasks_every", self.eval_tasks_every, self.eval_tasks_every >= 0, "must be >= 0")
        _check(
            "train.eval_tasks_limit",
            self.eval_tasks_limit,
            self.eval_tasks_limit is None or self.eval_tasks_limit > 0,
            "must be positive (documents per task, or a fraction below 1), or none for all",
        )
        _check("train.seed", self.seed, self.seed >= 0, "must be >= 0")
        _check("train.sample_tokens", self.sample_tokens, self.sample_tokens >= 0, "must be >= 0 (0: no sample)")
        _check(
            "train.peak_tflops",
            self.peak_tflops,
            self.peak_tflops is None or (_finite(self.peak_tflops) and self.peak_tflops > 0),
            "must be positive, or none to look it up from the device",
        )
        if self.profile_steps and not _is_step_range(self.profile_steps):
            raise UserError(
                f"train.profile_steps={self.profile_steps!r} must look like 'a:b' with 1 <= a <= b, e.g. 5:7"
            )

    @property
    def profile_range(self) -> tuple[int, int] | None:
        return tuple(int(x) for x in self.profile_steps.split(":")) if self.profile_steps else None


def _is_step_range(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and 1 <= int(parts[0]) <= int(parts[1])


DPO_LOSSES = ("sigmoid", "ipo")
# TRL 1.16's GRPOTrainer defaults to dapo: the clipped surrogate summed over the batch's completion tokens and
# divided by their count. grpo divides each completion by its own length, then averages the completions.
GRPO_LOSSES = ("dapo", "grpo")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of train.objective=dpo|grpo (lm.train.objectives); names and defaults follow TRL's
    DPOConfig and GRPOConfig. sft reads none of them."""

    beta: float = 0.1  # dpo: how far from the reference the preference may pull; grpo: the KL weight (k3)
    loss_type: Literal["sigmoid", "ipo", "dapo", "grpo"] | None = None  # none: sigmoid (dpo), dapo (grpo)
    reference: str = "base"  # base: the starting weights (LoRA: adapters off); or a run / Hugging Face folder
    rewards: tuple[str, ...] = ()  # grpo: "FILE.py:FUNCTION", called as TRL calls reward functions
    reward_weights: tuple[float, ...] = ()  # one per reward; empty: all 1
    group_size: int = 8  # grpo: completions sampled per prompt (TRL's num_generations)
    max_new_tokens: int = 128  # grpo: the longest completion
    temperature: float = 1.0  # grpo: sampling temperature, also applied to the log-probs (as TRL does)
    epsilon: float = 0.2  # grpo: the clip range of the probability ratio
    iterations: int = 1  # grpo: optimisation passes over each generated batch (TRL's num_iterations)

    def __post_init__(self):
        _check("objective.beta", self.beta, _finite(self.beta) and self.beta >= 0, "must be >= 0, e.g. 0.1")
        _check(
            "objective.loss_type",
            self.loss_type,
            self.loss_type is None or self.loss_type in DPO_LOSSES + GRPO_LOSSES,
            f"must be one of {list(DPO_LOSSES)} (dpo) or {list(GRPO_LOSSES)} (grpo), or none for the default",
        )
        _check("objective.reference", self.reference, bool(str(self.reference).strip()), "must be base or a folder")
        for spec in self.rewards:
            _check(
                "objective.rewards",
                spec,
                isinstance(spec, str) and re.fullmatch(r".+\.py:[A-Za-z_]\w*", spec) is not None,
                'entries must look like "FILE.py:FUNCTION", e.g. ["rewards.py:exact_answer"]',
            )
        _check(
            "objective.reward_weights",
            list(self.reward_weights),
            not self.reward_weights or len(self.reward_weights) == len(self.rewards),
            f"must give one weight per reward ({len(self.rewards)}), or none for all 1",
        )
        _check("objective.group_size", self.group_size, self.group_size >= 1, "must be >= 1, e.g. 8")
        _check("objective.max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "must be >= 1, e.g. 128")
        _check(
            "objective.temperature",
            self.temperature,
            _finite(self.temperature) and self.temperature > 0,
            "must be positive, e.g. 1.0",
        )
        _check("objective.epsilon", self.epsilon, _finite(self.epsilon) and 0 < self.epsilon < 1, "must be in (0, 1)")
        _check("objective.iterations", self.iterations, self.iterations >= 1, "must be >= 1")

    def loss_for(self, objective: str) -> str:
        """The loss type in force for train.objective (the default where none is set)."""
        return self.loss_type or {"dpo": "sigmoid", "grpo": "dapo"}.get(objective, "")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None: <run_dir>/checkpoints; a gs:// path on TPU pods
    every: int = 100
    keep: int = 3
    keep_period: int | None = None  # also keep every N-th step for good
    async_save: bool = True

    def __post_init__(self):
        _check(
            "checkpoint.dir",
            self.dir,
            self.dir is None or bool(str(self.dir).strip()),
            "must name a folder, or none for <run_dir>/checkpoints",
        )


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "nnx-lm"

    def __post_init__(self):
        _check(
            "logging.wandb",
            self.wandb,
            self.wandb in ("offline", "online", "disabled"),
            "must be offline, online or disabled",
        )


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str = "unnamed"
    hardware: str | None = None  # the topology it is planned for ('v5p-128', 'h100-80gb x8'); launch.plan's default
    description: str = ""  # what it trains, on which data, and the result to expect
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    init: InitConfig = InitConfig()
    lora: LoraConfig = LoraConfig()
    objective: ObjectiveConfig = ObjectiveConfig()

    def __post_init__(self):
        t = self.train
        self._check_objective()
        if t.batch_size % t.grad_accum:
            raise UserError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
        # With init.from the model section is only known once the source is read (lm.state.source).
        if t.seq_len > self.model.max_seq_len and not self.init.from_:
            raise UserError(
                f"train.seq_len={t.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower train.seq_len or raise model.max_seq_len"
            )
        positive = [
            ("train", n)
            for n in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "eval_batches")
        ]
        positive += [("checkpoint", "every"), ("checkpoint", "keep"), ("mesh", "dcn_data"), ("mesh", "dcn_fsdp")]
        for section, name in positive:
            value = getattr(getattr(self, section), name)
            if value <= 0:
                raise UserError(f"{section}.{name}={value} must be positive")
        if self.checkpoint.keep_period is not None and self.checkpoint.keep_period <= 0:
            raise UserError(f"checkpoint.keep_period={self.checkpoint.keep_period} must be positive or none")
        if t.per_device_batch_size < 0 or t.max_bad_steps < 0:
            raise UserError("train.per_device_batch_size and train.max_bad_steps must be >= 0")
        self._check_rules()

    def _check_objective(self):
        kind, o = self.train.objective, self.objective
        if o.loss_type is not None and kind != "sft":
            allowed = DPO_LOSSES if kind == "dpo" else GRPO_LOSSES
            _check(
                "objective.loss_type", o.loss_type, o.loss_type in allowed, f"must be one of {list(allowed)} for {kind}"
            )
        if kind == "dpo":
            _check("objective.beta", o.beta, o.beta > 0, "must be positive for dpo, e.g. 0.1")
        if kind == "grpo":
            if not o.rewards:
                raise UserError('train.objective=grpo needs objective.rewards, e.g. ["rewards.py:exact_answer"]')
            _check(
                "objective.group_size",
                o.group_size,
                o.group_size >= 2,
                "must be >= 2 for grpo (advantages compare a group)",
            )
            if self.train.batch_size % o.group_size:
                raise UserError(
                    f"train.batch_size={self.train.batch_size} (completions per step) is not divisible by "
                    f"objective.group_size={o.group_size}"
                )

    def _check_rules(self):
        names = {n for n, _ in DEFAULT_RULES}
        for rule in self.mesh.rules:
            if not isinstance(rule, tuple) or len(rule) != 2:
                raise UserError(
                    f'mesh.rules entries are [logical_name, mesh_axes] pairs, got {rule!r}; e.g. [["vocab", null]]'
                )
            name, axes = rule
            axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if name not in names:
                raise UserError(f"mesh.rules names unknown logical axis {name!r}; known: {sorted(names)}")
            bad = [a for a in axes_t if a not in AXES]
            if bad:
                raise UserError(f"mesh.rules maps {name!r} to unknown mesh axes {bad}; mesh axes are {list(AXES)}")

    def with_batch_for(self, batch_devices: int) -> "Recipe":
        """train.per_device_batch_size > 0 sets the global batch from the batch-parallel devices
        (data x fsdp)."""
        t = self.train
        if t.per_device_batch_size <= 0:
            return self
        train = dataclasses.replace(t, batch_size=t.per_device_batch_size * batch_devices)
        return dataclasses.replace(self, train=train)

    def logical_dims(self) -> dict[str, tuple[int, str]]:
        """The model's shardable sizes plus the (micro)batch, for sharding.partition.check_divisible."""
        t = self.train
        return {
            **self.model.logical_dims(),
            "batch": (t.batch_size // t.grad_accum, "train.batch_size/grad_accum"),
            "length": (t.seq_len, "train.seq_len"),
        }

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return _build(cls, d, "")


# ------------------------------------------------------------------------------------------------
# Overrides


def _key(field: dataclasses.Field) -> str:
    """The recipe key of a field: its name, unless that is a Python keyword (init.from)."""
    return field.metadata.get("key", field.name)


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {_key(f): hints[f.name] for f in dataclasses.fields(cls)}


def _to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[_key(f)] = _to_dict(value) if dataclasses.is_dataclass(value) else _copy(value)
    return out


def _copy(value):
    return tuple(_copy(v) for v in value) if isinstance(value, (tuple, list)) else value


def all_keys(cls=Recipe, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _parse(text: str, tp, key: str):
    """Parse a command-line string into the field's declared type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _parse(text, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0])
    if origin is Literal:
        if text not in args:
            raise UserError(f"{key}={text!r} is not one of {list(args)}")
        return text
    if origin is tuple:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = [s for s in text.split(",") if s]
        if not isinstance(value, list):
            value = [value]
        return _coerce(value, tp, key)
    if tp is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{key} expects true or false, got {text!r}")
    if tp in (int, float):
        try:
            value = float(text) if tp is float else int(text)
        except ValueError:
            raise UserError(f"{key} expects {tp.__name__}, got {text!r}") from None
        return value
    if tp is str:
        return text
    if tp is Any:
        return json.loads(text)
    raise UserError(f"{key} cannot be set from the command line")


def _coerce(value, tp, key):
    """Coerce a JSON value (recipe.json or a tuple override) into the declared type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if value is None:
            raise UserError(f"{key} expects a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if isinstance(value, list):
        return tuple(_coerce(v, Any, key) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _build(cls, d: dict, prefix: str):
    fields = _fields(cls)
    attrs = {_key(f): f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in d.items():
        if name not in fields:
            raise UserError(f"unknown recipe key {prefix}{name!r}")
        tp = fields[name]
        kwargs[attrs[name]] = (
            _build(tp, value, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else _coerce(value, tp, prefix + name)
        )
    return cls(**kwargs)


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply `key.path=value` strings, then validate once (so overrides may be given in any order).
    Unknown keys fail with the nearest valid ones."""
    keys = all_keys()
    tree = recipe.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key.path=value, got {item!r}")
        key, text = (part.strip() for part in item.split("=", 1))
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = (
                f"; did you mean {', '.join(near)}?"
                if near
                else f"; valid keys start with {sorted({k.split('.')[0] for k in keys})}"
            )
            raise UserError(f"unknown recipe key {key!r}{hint}")
        *parents, leaf = key.split(".")
        cls, node = Recipe, tree
        for name in parents:
            cls, node = _fields(cls)[name], node[name]
        node[leaf] = _parse(text, _fields(cls)[leaf], key)
    return Recipe.from_dict(tree)


# Keys a resumed run may change: they alter neither the saved state's shapes nor the data order.
SAFE_TO_CHANGE = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.sample_prompt",
    "train.sample_tokens",
    "train.peak_tflops",
    "train.grad_accum",
    "train.profile_steps",
    "train.compilation_cache",
    "train.eval_tasks",  # and eval_tasks_every, eval_tasks_limit
    "train.eval_include_path",
    *(f"model.{k}" for k in EXECUTION if k not in STORED),
    "mesh.",
    "checkpoint.",
    "logging.",
    "name",
    "hardware",
    "description",
)


def diff_recipes(saved: Recipe, new: Recipe) -> tuple[list[str], list[str]]:
    """(safe, conflicting) descriptions of the keys whose values differ."""

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield prefix + k, v

    old, cur = dict(flat(saved.to_dict())), dict(flat(new.to_dict()))
    safe, conflicts = [], []
    for key in cur:
        if old.get(key) != cur[key]:
            change = f"{key}: {old.get(key)!r} -> {cur[key]!r}"
            (safe if key.startswith(SAFE_TO_CHANGE) else conflicts).append(change)
    return safe, conflicts


# ------------------------------------------------------------------------------------------------
# Loading


def available_recipes() -> list[str]:
    folder = pathlib.Path(__file__).resolve().parents[2] / "recipes"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def load_recipe(name_or_file: str, overrides: list[str] = ()) -> Recipe:
    """A recipe by name (`recipes/<name>.py`) or by path to a .py file defining `recipe() -> Recipe`.

    Reads no checkpoint: with init.from, the model section comes from the source, which the caller
    resolves (lm.state.source.resolve_init)."""
    path = pathlib.Path(name_or_file)
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"recipe file {name_or_file} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if name_or_file not in available_recipes():
            raise UserError(f"unknown recipe {name_or_file!r}; choose one of {available_recipes()} or give a .py file")
        module = importlib.import_module(f"recipes.{name_or_file}")
    if not hasattr(module, "recipe"):
        raise UserError(f"recipe {name_or_file} defines no recipe() function")
    try:
        return apply_overrides(module.recipe(), list(overrides))
    except TypeError as e:  # a frozen dataclass rejecting a value of the wrong kind
        raise UserError(f"invalid recipe {name_or_file}: {e}") from None
