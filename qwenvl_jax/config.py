"""Model configuration: typed, frozen dataclasses with HF `config.json` field names.

`Qwen25VLConfig.from_hf_dict` reads both forms that exist on disk:
  * the published one (flat text fields, `rope_scaling: {type: mrope, mrope_section}`,
    `vision_config` with `in_chans` / `spatial_patch_size`, sometimes only partially filled);
  * the one transformers 5.x writes (nested `text_config`, `rope_parameters`).
`to_hf_dict` writes the published (flat) form, which transformers 4.x, 5.x and vLLM all load.
Presets live as YAML data in `configs/model/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or value that qwenvl_jax cannot use; the message names the key."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    # Defaults are the released Qwen2.5-VL values (SPEC section 3), not transformers' class defaults.
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # pixels
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # features per flattened patch row (1176 for the released models)
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:  # patches per LLM token
        return self.spatial_merge_size**2

    @property
    def window_patches(self) -> int:  # patches per full window (64 for window 112, patch 14)
        return (self.window_size // self.patch_size) ** 2

    def validate(self) -> None:
        _check(self.hidden_size % self.num_heads == 0, "vision_config.hidden_size",
               f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _check(self.head_dim % 4 == 0, "vision_config.hidden_size",
               f"head_dim {self.head_dim} must be divisible by 4 for the 2-D rotary embedding")
        _check(self.hidden_act == "silu", "vision_config.hidden_act",
               f"{self.hidden_act!r} is not supported (Qwen2.5-VL uses 'silu')")
        unit = self.patch_size * self.spatial_merge_size
        _check(self.window_size % unit == 0, "vision_config.window_size",
               f"{self.window_size} must be a multiple of patch_size*spatial_merge_size={unit}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        _check(not bad, "vision_config.fullatt_block_indexes",
               f"{bad} out of range for depth {self.depth}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        h, kv = self.num_attention_heads, self.num_key_value_heads
        _check(self.hidden_size % h == 0, "hidden_size",
               f"{self.hidden_size} is not divisible by num_attention_heads={h}")
        _check(h % kv == 0, "num_key_value_heads", f"{kv} does not divide num_attention_heads={h}")
        _check(self.head_dim % 2 == 0, "hidden_size", f"head_dim {self.head_dim} must be even")
        _check(len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
               "rope_scaling.mrope_section",
               f"{list(self.mrope_section)} must have 3 entries summing to head_dim/2={self.head_dim // 2}")
        _check(self.hidden_act == "silu", "hidden_act",
               f"{self.hidden_act!r} is not supported (Qwen2.5 uses 'silu')")


ATTENTION_IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int | tuple[int, ...] = 151645
    tie_word_embeddings: bool = False
    # Runtime choice, not part of config.json: "auto" takes the Pallas kernels on TPU and XLA
    # elsewhere; "pallas" off TPU runs them in interpret mode (slow; tests and checks).
    attention_impl: str = "auto"

    def __post_init__(self):
        self.vision.validate()
        self.text.validate()
        _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
               f"{self.attention_impl!r} is not one of {list(ATTENTION_IMPLS)}")
        _check(self.vision.out_hidden_size == self.text.hidden_size, "vision_config.out_hidden_size",
               f"{self.vision.out_hidden_size} must equal the text hidden_size {self.text.hidden_size}")

    # ----------------------------------------------------------------------------- presets / YAML
    @classmethod
    def from_preset(cls, name_or_path: str | Path) -> Qwen25VLConfig:
        """A preset name from configs/model/ ('7b', 'tiny', ...) or the path of a YAML file."""
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            presets = CONFIGS_DIR / "model"
            path = presets / f"{name_or_path}.yaml"
            if not path.is_file():  # short size names: '7b' -> qwen2.5-vl-7b.yaml
                path = presets / f"qwen2.5-vl-{str(name_or_path).lower()}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (CONFIGS_DIR / "model").glob("*.yaml"))
            raise ConfigError(f"model preset {str(name_or_path)!r} not found (known: {', '.join(known)})")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {}, source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Qwen25VLConfig:
        """Our own nested form: {vision: {...}, text: {...}, <top-level fields>}."""
        d = dict(d)
        vision = _build(VisionConfig, d.pop("vision", {}), f"{source}: vision")
        text = _build(TextConfig, d.pop("text", {}), f"{source}: text")
        return _build(cls, {**d, "vision": vision, "text": text}, source)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    # ----------------------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_file(cls, path: str | Path) -> Qwen25VLConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (expected an HF checkpoint's config.json)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Qwen25VLConfig:
        for key, value in (("", d), ("text_config", d.get("text_config") if isinstance(d, dict) else None),
                           ("vision_config", d.get("vision_config") if isinstance(d, dict) else None)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: {key or 'the file'} must be a JSON object, got {type(value).__name__}")
        model_type = d.get("model_type")
        if model_type not in (None, "qwen2_5_vl"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not 'qwen2_5_vl'")
        # 5.x nests the text fields; the published form keeps them flat. Nested wins where both exist.
        flat = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        t = {**flat, **(d.get("text_config") or {})}
        if t.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported "
                              "(released Qwen2.5-VL checkpoints use full attention)")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_scaling must be a JSON object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (expected mrope)")
        text_fields = {f.name for f in dataclasses.fields(TextConfig)} - {"rope_theta", "mrope_section"}
        text = {k: t[k] for k in text_fields if k in t and t[k] is not None}
        text["rope_theta"] = rope.get("rope_theta", t.get("rope_theta", TextConfig.rope_theta))
        text["mrope_section"] = tuple(rope.get("mrope_section", TextConfig.mrope_section))

        v = dict(d.get("vision_config") or {})
        aliases = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}
        v = {aliases.get(k, k): val for k, val in v.items() if not (k in aliases and aliases[k] in v)}
        vrope = v.get("rope_parameters") or {}
        vrope = vrope if isinstance(vrope, dict) else {}
        if "rope_theta" in vrope:
            v["rope_theta"] = vrope["rope_theta"]
        vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
        vision = {k: val for k, val in v.items() if k in vision_fields and val is not None}
        # A partial published vision_config leaves the rest at the released values (our defaults).
        vision.setdefault("out_hidden_size", text.get("hidden_size", TextConfig.hidden_size))

        top_fields = {"image_token_id", "video_token_id", "vision_start_token_id",
                      "vision_end_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings"}
        top = {k: d[k] for k in top_fields if d.get(k) is not None}
        if "tie_word_embeddings" not in top and (d.get("text_config") or {}).get("tie_word_embeddings"):
            top["tie_word_embeddings"] = True
        return _build(cls, {**top,
                            "vision": _build(VisionConfig, vision, f"{source}: vision_config"),
                            "text": _build(TextConfig, text, source)}, source)

    def to_hf_dict(self) -> dict[str, Any]:
        """The published flat form, complete (no field left to a library's class default)."""
        t, v = self.text, self.vision
        out = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "hidden_act": v.hidden_act,
                "in_chans": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                # transformers types this field int and rejects 2.0; a preset or YAML gives a float.
                "tokens_per_second": int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
                else v.tokens_per_second,
            },
        }
        return out


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def is_finite_number(value) -> bool:
    """An int or float (not a bool) of finite value: what every numeric input must be checked to be
    first (NaN passes every `< 0` check; an int past float range is no usable number either)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(val, kind, where: str, positive: bool):
    """val as `kind` (int or float): right type, finite, and > 0 for sizes (>= 0 for token ids)."""
    ok = is_finite_number(val)
    if ok and kind is int:
        ok = float(val).is_integer()
    if not ok:
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a finite number'}, got {val!r}")
    val = kind(val)
    if val < 0 or (positive and val == 0):
        raise ConfigError(f"{where}: must be {'> 0' if positive else '>= 0'}, got {val!r}")
    return val


def _typed(val, typ, where: str, positive: bool):
    """A config.json / YAML value checked against the field's type (strings for numbers, NaN,
    negative sizes are errors naming the key, never a crash later)."""
    if dataclasses.is_dataclass(typ):
        return val
    if typ in (int, float):
        return _number(val, typ, where, positive)
    if typ in (str, bool):
        if not isinstance(val, typ):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {val!r}")
        return val
    options = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:  # tuple[int, ...] or tuple[int, int, int]
        if not isinstance(val, tuple):
            raise ConfigError(f"{where}: expected a list of integers, got {val!r}")
        return tuple(_number(x, int, where, False) for x in val)
    if int in options:  # int | tuple[int, ...]
        return _typed(val, tuple[int, ...] if isinstance(val, tuple) else int, where, positive)
    return val


def _build(cls, values: dict[str, Any], source: str):
    """Instantiate a config dataclass, coercing lists to tuples; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} (known: {sorted(fields)})")
    hints = typing.get_type_hints(cls)
    kw = {}
    for name, val in values.items():
        if isinstance(val, list):
            val = tuple(val)
        kw[name] = _typed(val, hints[name], f"{source}: {name}", positive=cls in (VisionConfig, TextConfig))
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None
