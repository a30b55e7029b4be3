"""Write our params as an HF checkpoint: safetensors shards + index, config.json, and (copied from
a source checkpoint or tokenizer directory) the tokenizer, processor and generation files.

transformers (4.x and 5.x) and vLLM load the result; names and layouts are those of the published
checkpoints. Tensors are converted one at a time while a shard is filled.

Multi-host: every process calls this with the same (sharded) params; tensors are gathered one
layer's tensor at a time (a collective every process joins, in the same order), and only process
0 writes. No host ever holds more than one tensor plus the shard being filled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.sharding import to_host
from qwenvl_jax.weights import hf_keys
from qwenvl_jax.weights.files import SIDE_FILES
from qwenvl_jax.weights.load import INDEX_FILE

STALE_WEIGHT_FILES = ("model.safetensors", INDEX_FILE, "model-*-of-*.safetensors", "pytorch_model.bin",
                      "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")


def copy_side_files(src: str | Path, out: str | Path) -> list[str]:
    """Copies the SIDE_FILES that exist in src to out; returns their names (nothing is copied when
    src and out are the same directory: the files are already there)."""
    import shutil

    src, out = Path(src), Path(out)
    copied = [n for n in SIDE_FILES if (src / n).is_file()]
    if out.resolve() == src.resolve():
        return copied
    for name in copied:
        shutil.copy2(src / name, out / name)
    return copied


_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
_TORCH_DTYPE = {np.dtype(v): k for k, v in _DTYPES.items()}


GATHER_BYTES = 64 * 2**20


def _to_host(x, gather_bytes: int = GATHER_BYTES) -> np.ndarray:
    """One (possibly multi-process) array on this host: a plain copy when this process holds all of
    it, else all-gathers (which every process joins) of row blocks of at most `gather_bytes`, so
    the replicated temporaries on the devices stay small (HBM is full of training state when a
    run exports) and the host holds the tensor plus one block."""
    if getattr(x, "is_fully_addressable", True) or x.ndim == 0 or x.nbytes <= gather_bytes:
        return to_host(x)
    out = np.empty(x.shape, x.dtype)
    rows = max(1, gather_bytes // (x.nbytes // x.shape[0]))
    for start in range(0, x.shape[0], rows):
        out[start:start + rows] = to_host(x[start:start + rows])
    return out


def hf_tensors(state, config: Qwen25VLConfig, dtype=None, gather_bytes: int = GATHER_BYTES):
    """Yields (HF name, numpy tensor) for every parameter, per-layer tensors unstacked; a stacked
    parameter is brought to the host one layer at a time."""
    v = config.vision
    patch_shape = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        template, kind = hf_keys.hf_name(hf_keys.path_names(path))
        leaf = getattr(leaf, "value", leaf)
        if hf_keys.is_stacked(template):
            layers = ((template.format(i=i), lambda i=i: _to_host(leaf[i], gather_bytes))
                      for i in range(leaf.shape[0]))
        else:
            layers = [(template, lambda: _to_host(leaf, gather_bytes))]
        for name, fetch in layers:
            x = fetch()
            if dtype is not None:
                x = x.astype(dtype)
            shape = hf_keys.expected_hf_shape(x.shape, kind, patch_shape)
            yield name, np.ascontiguousarray(hf_keys.to_hf(x, kind, shape))


def _file_mode() -> int:
    """What a new file gets under the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_hf_checkpoint(out_dir: str | Path, state, config: Qwen25VLConfig, *, dtype: str | None = None,
                       max_shard_bytes: int = 5 * 2**30, gather_bytes: int = GATHER_BYTES,
                       side_files_from: str | Path | None = None) -> Path:
    """Writes model-0000k-of-0000n.safetensors + index (or one model.safetensors) and config.json;
    with `side_files_from` (a checkpoint or tokenizer directory) also copies the SIDE_FILES it has
    (tokenizer, chat template, processor and generation configs), so the result is complete.

    Each shard is written as soon as it is full, so host memory holds at most one shard. With
    several processes every one must call this; process 0 writes (side files included).
    """
    out = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    written: list[tuple[Path, list[str]]] = []
    current: dict[str, np.ndarray] = {}
    size, total, torch_dtype = 0, 0, "float32"

    def flush():
        tmp = out / f".shard-{len(written):05d}.tmp"
        if writer:
            save_file(current, str(tmp), metadata={"format": "pt"})  # transformers expects the marker
            tmp.chmod(_file_mode())  # safetensors creates it 0600; a checkpoint is shared like other files
        written.append((tmp, list(current)))

    for name, tensor in hf_tensors(state, config, _DTYPES.get(dtype) if dtype else None, gather_bytes):
        if current and size + tensor.nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
        torch_dtype = _TORCH_DTYPE.get(tensor.dtype, "float32")
    flush()
    if not writer:
        return out

    # Weight files of an earlier checkpoint in out_dir would be read beside (or, for a single
    # model.safetensors, instead of) the new shards: remove them, as transformers' save_pretrained does.
    for pattern in STALE_WEIGHT_FILES:
        for old in out.glob(pattern):
            old.unlink()
    if len(written) == 1:
        written[0][0].replace(out / "model.safetensors")
    else:
        weight_map = {}
        for k, (tmp, names) in enumerate(written):
            fname = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
            tmp.replace(out / fname)
            weight_map.update({n: fname for n in names})
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = torch_dtype
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if side_files_from is not None:
        copy_side_files(side_files_from, out)
    return out
