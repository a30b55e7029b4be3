"""The single table between our parameter paths and HF checkpoint tensor names (SPEC section 8).

Names on disk are the published ones (`visual.*`, `model.*`, `lm_head.weight`), which is also what
transformers 4.57 and 5.x write. Per-layer tensors map to one slice of our stacked [layers, ...]
parameters; the `{i}` in a name is the layer index.
"""

from __future__ import annotations

import numpy as np

# Ordered (ours, HF) substring renames; applied left to right to the dotted path.
_RENAMES = (
    ("visual.patch_embed.kernel", "visual.patch_embed.proj.kernel"),
    ("visual.blocks.", "visual.blocks.{i}."),
    ("visual.merger.fc1.", "visual.merger.mlp.0."),
    ("visual.merger.fc2.", "visual.merger.mlp.2."),
    ("language_model.layers.", "model.layers.{i}."),
    ("language_model.", "model."),
    ("embed_tokens.embedding", "embed_tokens.weight"),
)

LINEAR, CONV, COPY = "linear", "conv", "copy"


def canonical_name(key: str) -> str:
    """transformers' in-memory names (model.visual.*, model.language_model.*) -> on-disk names."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def path_names(jax_path) -> tuple[str, ...]:
    """A jax tree path into an nnx.State -> our dotted-path parts (drops the Variable's `.value`)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", None))) for k in jax_path
                 if not hasattr(k, "name"))


def hf_name(path: tuple[str, ...]) -> tuple[str, str]:
    """Our state path parts -> (HF name template, value transform kind)."""
    name = ".".join(path)
    for ours, theirs in _RENAMES:
        name = name.replace(ours, theirs)
    kind = COPY
    if name.endswith(".kernel"):
        kind = CONV if name == "visual.patch_embed.proj.kernel" else LINEAR
        name = name[: -len("kernel")] + "weight"
    return name, kind


def is_stacked(template: str) -> bool:
    return "{i}" in template


def to_hf(value: np.ndarray, kind: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    """Our layout -> HF tensor of `hf_shape`."""
    if kind in (LINEAR, CONV):
        return np.ascontiguousarray(value.T).reshape(hf_shape)
    return value


def expected_hf_shape(shape: tuple[int, ...], kind: str, patch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF shape of one (unstacked) tensor given our shape; patch_shape = (C, T, p, p) for the conv."""
    if kind == LINEAR:
        return tuple(reversed(shape))
    if kind == CONV:
        return (shape[1], *patch_shape)
    return tuple(shape)
