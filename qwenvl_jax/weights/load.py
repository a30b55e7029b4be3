"""Read an HF checkpoint (safetensors or PyTorch .bin, single file or sharded with an index, and
optionally a PEFT LoRA adapter merged in) into our param tree.

Each parameter is created directly in its sharded layout (`jax.make_array_from_callback`): every
device's slice is read from disk on its own, so a process reads and holds only what its devices
hold. Per-layer tensors are written into their slot of the stacked parameter with a donated
in-place update, so host memory stays near one layer's local slice, never the model.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.qwen25vl import Qwen25VL
from qwenvl_jax.sharding import Layout
from qwenvl_jax.weights import hf_keys
from qwenvl_jax.weights.files import SAFE_INDEX, CheckpointError, weight_files
from qwenvl_jax.weights.safetensors_reader import SafetensorsFile, SafetensorsFormatError
from qwenvl_jax.weights.torch_bin import TorchBinError, TorchBinFile

INDEX_FILE = SAFE_INDEX
__all__ = ["CheckpointError", "CheckpointTensors", "INDEX_FILE", "abstract_model", "load_params", "open_tensor_file"]


def open_tensor_file(file: Path):
    """A SafetensorsFile or TorchBinFile for `file`, errors as CheckpointError naming it."""
    if file.suffix == ".bin":
        try:
            return TorchBinFile(file)
        except TorchBinError as e:
            raise CheckpointError(str(e)) from None
    try:
        return SafetensorsFile(file)
    except (OSError, SafetensorsFormatError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


class CheckpointTensors:
    """Tensor name (on-disk form, see hf_keys.canonical_name) -> slices read from disk, across the
    files of one checkpoint directory (weights.files decides which)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files, weight_map = weight_files(self.path)
        self._handles, self._where = {}, {}
        for file in files:
            handle = open_tensor_file(file)
            self._handles[file.name] = handle
            names = handle.keys()
            if weight_map is not None:  # the index decides which file holds a tensor
                listed = {k for k, f in weight_map.items() if f == file.name}
                missing = sorted(listed - set(names))
                if missing:
                    raise CheckpointError(f"{file}: does not hold {missing[:3]}, which the index places there")
                names = [k for k in names if k in listed]
            for key in names:
                name = hf_keys.canonical_name(key)
                if name in self._where:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is stored twice "
                                          f"({self._where[name][0]} and {file.name})")
                self._where[name] = (file.name, key)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        name, raw = self._where[key]
        return self._handles[name].shape(raw)

    def get(self, key: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """tensor[index] (unit-step slices), read from disk."""
        name, raw = self._where[key]
        try:
            return self._handles[name].read(raw, index)
        except (OSError, SafetensorsFormatError) as e:
            raise CheckpointError(f"{self.path / name}: cannot read tensor {key!r} ({e})") from None


def abstract_model(config: Qwen25VLConfig, param_dtype=jnp.float32, dtype=None):
    """(graphdef, abstract state) without allocating parameters."""
    model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype))
    return nnx.split(model)


# A stacked parameter whose blocks on this process's devices take at most this many bytes is
# stacked on the host and transferred once per device (no compile); a larger one is written into
# its sharded stack one layer at a time, so the host never holds more than a layer of it.
STACK_ON_HOST_BYTES = 1 << 30


@functools.cache
def _layer_setter(sharding):
    """Writes one layer into a stacked parameter in place (donated), keeping its sharding."""
    def update(stacked, layer, i):
        return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)
    return jax.jit(update, donate_argnums=0, out_shardings=sharding)


def _hf_index(index: tuple[slice, ...], kind: str) -> tuple[slice, ...]:
    """The slice of the HF tensor that holds our-layout slice `index` (for CONV: its D rows)."""
    if kind == hf_keys.LINEAR:
        return tuple(reversed(index))
    if kind == hf_keys.CONV:
        return (index[1],)
    return index


def load_params(path: str | Path, config: Qwen25VLConfig, *, param_dtype=jnp.float32, dtype=None,
                layout: Layout | None = None, tensors=None):
    """Returns (graphdef, state) with every parameter read from the checkpoint at `path` (or from
    `tensors`: a CheckpointTensors-like source such as lora.MergedTensors), each placed in the
    sharding `layout` gives it (default: one device)."""
    layout = (layout or Layout.create()).for_model(config)
    ckpt = tensors if tensors is not None else CheckpointTensors(path)
    graphdef, abstract = abstract_model(config, param_dtype, dtype)
    v = config.vision
    patch_shape = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    used: set[str] = set()

    def check(name: str, kind: str, shape: tuple[int, ...]) -> None:
        want = hf_keys.expected_hf_shape(shape, kind, patch_shape)
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: missing tensor {name!r} (expected shape {list(want)})")
        got = ckpt.shape(name)
        if got != want:
            empty = (" (an empty tensor: DeepSpeed ZeRO-3 saves those unless its 16-bit weights are gathered "
                     "on save; run zero_to_fp32.py on the checkpoint instead)") if 0 in got else ""
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(got)}, "
                                  f"expected {list(want)}{empty}")
        used.add(name)

    def read_part(name: str, kind: str, index: tuple[slice, ...]) -> np.ndarray:
        """The our-layout slice `index` (unit-step, bounded) of tensor `name`, in param_dtype."""
        part = ckpt.get(name, _hf_index(index, kind))
        if kind == hf_keys.CONV:  # [d, C, T, p, p] -> [C*T*p*p, d], then our row slice
            part = part.reshape(part.shape[0], -1).T[index[0]]
        elif kind == hf_keys.LINEAR:
            part = part.T
        return np.ascontiguousarray(part, dtype=param_dtype)

    def from_callback(shape, sharding, read_block) -> jax.Array:
        """A global array whose device blocks come from read_block(bounded index); devices holding
        the same block (replicas) share one read."""
        cache = {}

        def read(index):
            index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
            key = tuple((s.start, s.stop) for s in index)
            if key not in cache:
                cache[key] = read_block(index)
            return cache[key]

        return jax.make_array_from_callback(shape, sharding, read)

    def read_sharded(name: str, kind: str, shape: tuple[int, ...], sharding) -> jax.Array:
        check(name, kind, shape)
        return from_callback(shape, sharding, lambda index: read_part(name, kind, index))

    def read_stacked(template: str, kind: str, shape: tuple[int, ...], sharding) -> jax.Array:
        """All layers of a stacked parameter at once, each device's block stacked on the host."""
        for i in range(shape[0]):
            check(template.format(i=i), kind, shape[1:])
        return from_callback(shape, sharding, lambda index: np.stack(
            [read_part(template.format(i=i), kind, index[1:]) for i in range(index[0].start, index[0].stop)]))

    def load_leaf(path, var):
        template, kind = hf_keys.hf_name(hf_keys.path_names(path))
        axes, shape = var.get_metadata()["axes"], var.value.shape
        sharding = layout.sharding(axes, shape)
        if not hf_keys.is_stacked(template):
            return var.replace(read_sharded(template, kind, shape, sharding))
        local_bytes = (math.prod(sharding.shard_shape(shape)) * np.dtype(param_dtype).itemsize
                       * len(sharding.addressable_devices))
        if local_bytes <= STACK_ON_HOST_BYTES:  # small: one transfer per device, nothing to compile
            return var.replace(read_stacked(template, kind, shape, sharding))
        # large: one layer at a time on the host, written into the sharded stack in place
        layer_sharding = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        stacked, setter = jnp.zeros(shape, param_dtype, device=sharding), _layer_setter(sharding)
        for i in range(shape[0]):
            layer = read_sharded(template.format(i=i), kind, shape[1:], layer_sharding)
            stacked = setter(stacked, layer, i)
        return var.replace(stacked)

    state = jax.tree.map_with_path(load_leaf, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    unexpected = sorted(set(ckpt.keys()) - used - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{ckpt.path}: unexpected tensor(s) {unexpected[:5]}{more} "
                              "not used by a Qwen2.5-VL model of this config")
    return graphdef, state
