"""PEFT LoRA adapters, merged into the base weights as they are read.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`), as
`PeftModel.save_pretrained` writes them. For every adapted linear layer the merged weight is

    W + scaling * B @ A,   scaling = alpha / r   (alpha / sqrt(r) with use_rslora)

with r and alpha per module from `rank_pattern` / `alpha_pattern` (peft's suffix-pattern match);
embedding layers use lora_embedding_A / _B the same way, transposed. Tensors the adapter saves
whole (`modules_to_save`, trained biases, the base weight peft saves beside an embedding's
factors) replace the base's. `MergedTensors` wraps a base
checkpoint's tensors and merges per requested slice, so each device's shard of a weight is merged
on its own: a 72B base with an adapter loads with the memory of the base alone (plus the adapter's
A/B factors, which are small).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from qwenvl_jax.config import is_finite_number
from qwenvl_jax.weights import hf_keys
from qwenvl_jax.weights.files import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
_LINEAR_A, _LINEAR_B = ".lora_A.weight", ".lora_B.weight"
_EMBED_A, _EMBED_B = ".lora_embedding_A", ".lora_embedding_B"


def pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches a dotted suffix of
    the module's name (as a regular expression), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _positive(value) -> bool:
    return is_finite_number(value) and value > 0


class LoraAdapter:
    """A PEFT LoRA adapter directory: per target tensor its (A, B, scaling, embedding?) factors,
    and the tensors it replaces whole."""

    def __init__(self, path: str | Path):
        from qwenvl_jax.weights.load import open_tensor_file

        self.path = Path(path)
        cfg = self._read_config()
        files = [self.path / n for n in ADAPTER_WEIGHTS if (self.path / n).is_file()]
        if not files:
            raise CheckpointError(f"{self.path}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")
        self.file = files[0]
        self._handle = open_tensor_file(self.file)
        factors: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key, "embedding": bool}
        self.replaced: dict[str, str] = {}  # on-disk tensor name -> adapter key
        for key in self._handle.keys():
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{self.file}: tensor {key!r} is not a PEFT adapter tensor "
                                      f"(names start with {PREFIX!r})")
            name = key[len(PREFIX):]
            for suffix, role, embedding in ((_LINEAR_A, "A", False), (_LINEAR_B, "B", False),
                                            (_EMBED_A, "A", True), (_EMBED_B, "B", True)):
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    entry = factors.setdefault(module, {"embedding": embedding})
                    entry[role] = key
                    break
            else:
                if "lora_magnitude_vector" in name:
                    raise CheckpointError(f"{self.file}: a DoRA adapter ({key!r}); only plain LoRA is supported")
                if ".lora_" in name or not name.endswith((".weight", ".bias")):
                    raise CheckpointError(f"{self.file}: adapter tensor {key!r} is not supported "
                                          "(LoRA A/B factors and whole modules_to_save tensors are)")
                # peft saves a trained embedding layer's base weight as <module>.base_layer.weight
                self.replaced[hf_keys.canonical_name(name.replace(".base_layer.", "."))] = key
        self.lora: dict[str, tuple[str, str, float, bool]] = {}  # on-disk weight name -> (A key, B key, scaling, emb)
        for module, entry in factors.items():
            if "A" not in entry or "B" not in entry:
                raise CheckpointError(f"{self.file}: {module} has only one of its LoRA factors (A and B)")
            a_shape, b_shape = self._handle.shape(entry["A"]), self._handle.shape(entry["B"])
            for key, shape in ((entry["A"], a_shape), (entry["B"], b_shape)):
                if 0 in shape or len(shape) < 2:
                    raise CheckpointError(f"{self.file}: tensor {key!r} has shape {list(shape)} (an empty tensor: "
                                          "DeepSpeed ZeRO-3 writes these unless the weights are gathered on save)")
            if len(a_shape) != 2:
                raise CheckpointError(f"{self.file}: {module}: LoRA on a convolution is not supported "
                                      f"(lora_A shape {list(a_shape)})")
            r = a_shape[0]
            try:
                want_r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r"))
                alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
            except re.error as e:
                raise CheckpointError(f"{self.path / ADAPTER_CONFIG}: a rank/alpha pattern is not a valid "
                                      f"regular expression ({e})") from None
            if not _positive(alpha) or (want_r is not None and not _positive(want_r)):
                raise CheckpointError(f"{self.path / ADAPTER_CONFIG}: {module}: r and lora_alpha must be positive "
                                      f"numbers, got {want_r!r} and {alpha!r}")
            if want_r is not None and want_r != r:
                raise CheckpointError(f"{self.file}: {module}: lora_A has rank {r}, {ADAPTER_CONFIG} gives r={want_r}")
            if b_shape[1] != r:
                raise CheckpointError(f"{self.file}: {module}: lora_B shape {list(b_shape)} does not match "
                                      f"lora_A shape {list(a_shape)}")
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.lora[hf_keys.canonical_name(f"{module}.weight")] = (entry["A"], entry["B"], float(scaling),
                                                                     entry["embedding"])
        self._factors: dict[str, np.ndarray] = {}

    def _read_config(self) -> dict:
        file = self.path / ADAPTER_CONFIG
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: adapter directory not found")
        if not file.is_file():
            raise CheckpointError(f"{self.path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
        try:
            cfg = json.loads(file.read_text())
            if not isinstance(cfg, dict):
                raise TypeError("not a JSON object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{file}: not a valid adapter config ({e})") from None
        kind = cfg.get("peft_type", "LORA")
        if kind != "LORA":
            raise CheckpointError(f"{file}: peft_type {kind!r} is not supported (LoRA adapters are)")
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias (a bias on lora_B)"),
                           ("layer_replication", "layer_replication"), ("target_parameters", "target_parameters")):
            if cfg.get(flag):
                raise CheckpointError(f"{file}: {what} adapters are not supported (plain LoRA is)")
        for key in ("r", "lora_alpha"):
            value = cfg.get(key)
            if value is not None and not _positive(value):
                raise CheckpointError(f"{file}: {key} must be a positive number, got {value!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(cfg.get(key) or {}, dict):
                raise CheckpointError(f"{file}: {key} must be an object of pattern: value")
        return cfg

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.shape(key))

    def read(self, key: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        return self._handle.read(key, index)

    def touched(self) -> set[str]:
        return set(self.lora) | set(self.replaced)

    def factor(self, key: str) -> np.ndarray:
        if key not in self._factors:
            self._factors[key] = np.asarray(self.read(key), np.float32)
        return self._factors[key]

    def delta(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """scaling * (B @ A) restricted to `index` of the HF-layout weight, float32."""
        a_key, b_key, scaling, embedding = self.lora[name]
        rows, cols = (tuple(index) + (slice(None),) * 2)[:2]
        a, b = self.factor(a_key), self.factor(b_key)
        if embedding:  # weight [vocab, dim] += scaling * (B [dim, r] @ A [r, vocab]).T
            return scaling * (a[:, rows].T @ b[cols].T)
        return scaling * (b[rows] @ a[:, cols])  # weight [out, in] += scaling * B [out, r] @ A [r, in]


class MergedTensors:
    """A base checkpoint's tensors with an adapter merged in, read slice by slice (the interface of
    load.CheckpointTensors). With tied embeddings in the base and an adapter that changes the
    embedding or the output head, the merged model has both, untied (`untied` is then True): the
    head starts from the base's embedding, as in peft's forward."""

    def __init__(self, base, adapter: LoraAdapter, tied: bool):
        self.base, self.adapter = base, adapter
        self.path = base.path
        self._alias = {}
        if tied and LM_HEAD not in base and adapter.touched() & {EMBED, LM_HEAD}:
            self._alias[LM_HEAD] = EMBED
        self.untied = bool(self._alias)
        for name, (a_key, b_key, _, embedding) in adapter.lora.items():
            if name not in self:
                raise CheckpointError(f"{adapter.file}: the adapter changes {name!r}, which the base "
                                      f"checkpoint {base.path} does not hold")
            out_in = self.shape(name)
            a, b = adapter.tensor_shape(a_key), adapter.tensor_shape(b_key)
            want_a, want_b = ((out_in[0],), (out_in[1],)) if embedding else ((out_in[1],), (out_in[0],))
            if len(out_in) != 2 or a[1:] != want_a or b[:1] != want_b:
                raise CheckpointError(f"{adapter.file}: LoRA factors of {name!r} have shapes {list(a)} and {list(b)}, "
                                      f"which do not fit the base tensor's {list(out_in)}")
        for name, key in adapter.replaced.items():
            if name not in base and name not in self._alias:
                raise CheckpointError(f"{adapter.file}: tensor {key!r} replaces {name!r}, which the base "
                                      f"checkpoint {base.path} does not hold")
            if adapter.tensor_shape(key) != self.shape(name):
                raise CheckpointError(f"{adapter.file}: tensor {key!r} has shape {list(adapter.tensor_shape(key))}, "
                                      f"the base's {name!r} is {list(self.shape(name))}")

    def keys(self) -> list[str]:
        return list(dict.fromkeys([*self.base.keys(), *self._alias, *self.adapter.replaced]))

    def __contains__(self, name: str) -> bool:
        return name in self.base or name in self._alias or name in self.adapter.replaced

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.adapter.replaced:
            return tuple(self.adapter.tensor_shape(self.adapter.replaced[name]))
        return self.base.shape(self._alias.get(name, name))

    def get(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        if name in self.adapter.replaced:  # modules_to_save, or the base weight under a LoRA embedding
            part = self.adapter.read(self.adapter.replaced[name], index)
        else:
            part = self.base.get(self._alias.get(name, name), index)
        if name in self.adapter.lora:
            part = np.asarray(part, np.float32) + self.adapter.delta(name, index)
        return part
