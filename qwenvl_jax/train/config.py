"""Training configuration: typed dataclasses read from YAML, with dotted command-line overrides.

    cfg = load_train_config("configs/train/sft.yaml", ["train.steps=100", "mesh=data=1,fsdp=-1,tensor=4"])

Stages (the Qwen2.5-VL recipe) decide which parameter groups train:
    vision  stage 1: ViT + merger, LLM frozen
    all     stage 2: everything
    long    stage 3: everything, long-context packing (data.seq_len 32768)
    sft     ViT frozen (merger + LLM train)
    dpo     ViT frozen, preference pairs against a frozen reference model
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from qwenvl_jax.config import ConfigError
from qwenvl_jax.data.pipeline import DataConfig

STAGES = {
    "vision": ("vision", "merger"),
    "all": ("vision", "merger", "llm"),
    "long": ("vision", "merger", "llm"),
    "sft": ("merger", "llm"),
    "dpo": ("merger", "llm"),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    preset: str | None = "tiny"  # from scratch: a preset name or YAML (configs/model/)
    init_from: str | None = None  # or an HF checkpoint directory
    tokenizer: str | None = None  # tokenizer/template/processor dir (default: init_from)
    attention_impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    path: str = "synthetic"  # JSONL / ArrayRecord file, or "synthetic" (generated tiny dataset)
    # data.root: the directory relative image/video paths inside the data file resolve against
    # (a relative root is taken from the current directory). None: the data file's own directory,
    # wherever training is started from. Absolute media paths are used as written; ArrayRecord
    # files carry their media and need none. Command-line tools that take a data file spell it --data-root.
    root: str | None = None
    config: DataConfig = DataConfig(epochs=None)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    stage: str = "sft"
    steps: int = 100
    grad_accum: int = 1
    remat: str = "full"  # none | full | dots
    # The loss makes f32 logits for this many positions at a time (0: the whole row). 2048 x 151936
    # f32 is 1.2 GiB per row; a 32768-token row at once would be 19 GiB.
    loss_chunk: int = 2048
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "bfloat16"
    seed: int = 0
    log_every: int = 1
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    dpo_beta: float = 0.1


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    learning_rate: float = 1e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0  # on matrices only (norms, biases: none)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # Multiplier on learning_rate for the "vision" group (ViT blocks + patch embed); the merger and
    # the LLM use learning_rate.
    vision_lr_scale: float = 1.0
    # A further multiplier for the patch embed alone. Its fan-in is 1176 pixels: on flat backgrounds
    # every input is the same, so each Adam step moves its output by ~lr * 2000 along one direction.
    patch_embed_lr_scale: float = 1.0
    # Multiplier for the 2x2 merger, whose outputs are the LLM's image-token embeddings.
    merger_lr_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/tiny"
    mesh: str | None = None  # "data=1,fsdp=-1,tensor=4"; None: all devices on fsdp
    export_hf: str | None = None  # write the final params as an HF checkpoint here
    tensorboard: bool = False
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: LoopSpec = LoopSpec()
    optim: OptimSpec = OptimSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()

    def validate(self) -> None:
        t = self.train
        if t.stage not in STAGES:
            raise ConfigError(f"train.stage must be one of {list(STAGES)}, got {t.stage!r}")
        for key, value in (("train.steps", t.steps), ("train.grad_accum", t.grad_accum),
                           ("checkpoint.every", self.checkpoint.every), ("checkpoint.keep", self.checkpoint.keep),
                           ("train.log_every", t.log_every)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if t.remat not in ("none", "full", "dots"):
            raise ConfigError(f"train.remat must be none, full or dots, got {t.remat!r}")
        if not 0 <= t.seed < 2**32:
            raise ConfigError(f"train.seed must be in [0, 2**32), got {t.seed}")
        if t.loss_chunk < 0:
            raise ConfigError(f"train.loss_chunk must be >= 0 (0: the whole row at once), got {t.loss_chunk}")
        if self.optim.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.optim.learning_rate}")
        for key in ("vision_lr_scale", "patch_embed_lr_scale", "merger_lr_scale"):
            if getattr(self.optim, key) <= 0:
                raise ConfigError(f"optim.{key} must be > 0, got {getattr(self.optim, key)}")
        if (self.model.preset is None) == (self.model.init_from is None):
            raise ConfigError("exactly one of model.preset (from scratch) and model.init_from (HF checkpoint)")
        self.data.config.validate()

    @property
    def trainable(self) -> tuple[str, ...]:
        return STAGES[self.train.stage]


def _build(cls, values: dict, where: str, base=None):
    """dict -> dataclass (over `base`'s values when given: nested sections keep their own
    defaults), recursing into dataclass-typed fields; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(fields)})")
    out = {}
    for key, value in values.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            default = getattr(base, key) if base is not None else fields[key].default
            default = None if default is dataclasses.MISSING else default
            out[key] = _build(typ, value or {}, f"{where}.{key}" if where else key, default)
        else:
            out[key] = _coerce(value, typ, f"{where}.{key}" if where else key)
    try:
        return dataclasses.replace(base, **out) if base is not None else cls(**out)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(value, typ, where: str):
    """A YAML/CLI scalar -> the field's type ('1e-3' is a string to YAML 1.1); wrong types are
    one clear error naming the key."""
    args = typing.get_args(typ)
    options = [a for a in args if a is not type(None)] if args else [typ]
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: a value is required")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option in (int, float) and not isinstance(value, bool):
            try:
                number = option(value)
            except (TypeError, ValueError):
                continue
            if option is int and isinstance(value, float) and not value.is_integer():
                continue
            if option is float and not math.isfinite(number):  # NaN passes every `< 0` check
                raise ConfigError(f"{where}: must be a finite number, got {value!r}")
            return number
        if option is str and isinstance(value, str):
            return value
        if option not in (bool, int, float, str):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _section(cfg_tree: dict) -> dict:
    """Our YAML nests DataConfig under data.config; accept its keys directly under data too."""
    data = cfg_tree.get("data")
    if isinstance(data, dict):
        inner = {k: data.pop(k) for k in list(data) if k in {f.name for f in dataclasses.fields(DataConfig)}}
        if inner:
            data.setdefault("config", {}).update(inner)
    return cfg_tree


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or None for defaults) + 'a.b=value' overrides (values parsed as YAML scalars)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: training config not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        value = raw if key == "mesh" else yaml.safe_load(raw)
        _set_dotted(tree, key.strip(), value)
    cfg = _build(TrainConfig, _section(tree), "")
    if cfg.model.init_from is not None and "preset" not in (tree.get("model") or {}):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, preset=None))
    cfg.validate()
    return cfg
