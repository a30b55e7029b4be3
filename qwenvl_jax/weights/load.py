"""Read an HF safetensors checkpoint (single file or sharded with an index) into our param tree.

Tensors stream one at a time from memory-mapped files into device arrays; per-layer tensors are
written into their slot of the stacked parameter with a donated in-place update, so peak host
memory stays near the converted result plus one tensor (never two copies of the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors' numpy reader needs it)
import numpy as np
from flax import nnx
from safetensors import safe_open

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.qwen25vl import Qwen25VL
from qwenvl_jax.weights import hf_keys

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


class SafetensorsCheckpoint:
    """Tensor name -> memory-mapped numpy array, across the shards of one checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
        self._handles, self._where = {}, {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
            try:
                handle = safe_open(str(file), framework="numpy")
                keys = list(handle.keys())
            except Exception as e:  # the library raises several types for a damaged file
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
            self._handles[name] = handle
            for key in keys:
                self._where[hf_keys.canonical_name(key)] = (name, key)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        name, raw = self._where[key]
        return tuple(self._handles[name].get_slice(raw).get_shape())

    def get(self, key: str) -> np.ndarray:
        name, raw = self._where[key]
        try:
            return self._handles[name].get_tensor(raw)
        except Exception as e:
            raise CheckpointError(f"{self.path / name}: cannot read tensor {key!r} ({e})") from None


def abstract_model(config: Qwen25VLConfig, param_dtype=jnp.float32, dtype=None):
    """(graphdef, abstract state) without allocating parameters."""
    model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype))
    return nnx.split(model)


def _update_layer(stacked, layer, i):
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)


# Donated: the stacked buffer is updated in place, one layer at a time.
_set_layer = jax.jit(_update_layer, donate_argnums=0)


def load_params(path: str | Path, config: Qwen25VLConfig, *, param_dtype=jnp.float32, dtype=None):
    """Returns (graphdef, state) with every parameter read from the checkpoint at `path`."""
    ckpt = SafetensorsCheckpoint(path)
    graphdef, abstract = abstract_model(config, param_dtype, dtype)
    v = config.vision
    patch_shape = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    used: set[str] = set()

    def read(name: str, kind: str, shape: tuple[int, ...]) -> np.ndarray:
        want = hf_keys.expected_hf_shape(shape, kind, patch_shape)
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: missing tensor {name!r} (expected shape {list(want)})")
        got = ckpt.shape(name)
        if got != want:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(got)}, "
                                  f"expected {list(want)}")
        used.add(name)
        return hf_keys.from_hf(ckpt.get(name), kind).astype(param_dtype)

    def load_leaf(path, leaf):
        template, kind = hf_keys.hf_name(hf_keys.path_names(path))
        if not hf_keys.is_stacked(template):
            return jnp.asarray(read(template, kind, leaf.shape))
        stacked = jnp.zeros(leaf.shape, param_dtype)
        for i in range(leaf.shape[0]):
            stacked = _set_layer(stacked, read(template.format(i=i), kind, leaf.shape[1:]), i)
        return stacked

    state = jax.tree_util.tree_map_with_path(load_leaf, abstract)
    unexpected = sorted(set(ckpt.keys()) - used - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{ckpt.path}: unexpected tensor(s) {unexpected[:5]}{more} "
                              "not used by a Qwen2.5-VL model of this config")
    return graphdef, state
