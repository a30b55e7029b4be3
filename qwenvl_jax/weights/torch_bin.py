"""Reads PyTorch `.bin` checkpoints (`pytorch_model.bin`, its shards, `adapter_model.bin`).

Only through `torch.load(weights_only=True)`: a `.bin` file is a pickle, and a pickle that holds
anything but tensors and plain containers could run code when unpickled, so such a file is refused
rather than read. Files in torch's zip format are memory-mapped (`mmap=True`), so opening a shard
reads nothing until a tensor slice is asked for. torch is an optional dependency, needed only here.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np


class TorchBinError(ValueError):
    """A `.bin` file that cannot be read; the message names the file."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


class TorchBinFile:
    """One `.bin` state dict: tensor names, shapes, and slice reads as numpy (bf16 / fp8 exact)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        torch = _import_torch()
        if torch is None:
            raise TorchBinError(f"{self.path}: reading a PyTorch .bin checkpoint needs torch "
                                "(pip install 'qwenvl_jax[torch]'), or convert it to safetensors first")
        self._torch = torch
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise TorchBinError(f"{self.path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
            try:  # torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped
                state = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as e2:  # noqa: BLE001 - any failure is this file's fault, reported in one line
                raise TorchBinError(f"{self.path}: not a readable PyTorch checkpoint ({_first_line(e2)})") from None
        except Exception as e:  # noqa: BLE001 - includes weights_only refusing a pickle
            if "weights_only" in str(e) or "Weights only" in str(e):
                raise TorchBinError(f"{self.path}: refused: it holds more than tensors, and loading it "
                                    "would run its pickled code (torch.load weights_only=True)") from None
            raise TorchBinError(f"{self.path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            kind = type(state).__name__
            raise TorchBinError(f"{self.path}: expected a state dict of tensors (as save_pretrained writes), "
                                f"got a {kind}" + (f" with keys {list(state)[:5]}" if isinstance(state, dict) else ""))
        self._tensors = state

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """tensor[index] as a numpy array of the tensor's own dtype."""
        return to_numpy(self._torch, self._tensors[name][tuple(index)])

    def close(self) -> None:
        self._tensors = {}


def to_numpy(torch, t) -> np.ndarray:
    """A CPU tensor as numpy, bit for bit (numpy has no bfloat16/float8: those go through ml_dtypes)."""
    t = t.detach().contiguous()
    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
               torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    if t.dtype in special:
        raw, dtype = special[t.dtype]
        return t.view(raw).numpy().view(dtype)
    return t.numpy()
