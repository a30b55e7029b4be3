"""Reads slices of tensors from safetensors files with positioned reads (no memory map).

Sharded loading asks for one device's slice of a tensor at a time. Reading through `os.pread`
keeps host memory to the slice being read: a memory-mapped file would leave every touched page
resident in the process for as long as the file stays open, which for a 72B checkpoint is the
whole checkpoint. Format: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 2**20


class SafetensorsFormatError(ValueError):
    pass


class SafetensorsFile:
    """One .safetensors file: tensor names, shapes, and slice reads. Raises SafetensorsFormatError
    (naming the problem) for a truncated or malformed file when opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = -1
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._entries = self._read_header()
        except Exception:
            self.close()
            raise

    def _read_header(self) -> dict:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise SafetensorsFormatError(f"file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsFormatError(f"header is a JSON {type(header).__name__}, not an object")
        self._data_start = 8 + n
        header.pop("__metadata__", None)
        entries = {}
        for name, info in header.items():
            try:
                dtype = np.dtype(DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsFormatError(f"tensor {name!r}: unsupported or malformed entry {info}") from None
            if begin < 0 or min(shape, default=0) < 0:
                raise SafetensorsFormatError(f"tensor {name!r}: negative offset or dimension in {info}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise SafetensorsFormatError(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} "
                                             f"of {info['dtype']}")
            if self._data_start + end > size:
                raise SafetensorsFormatError(f"tensor {name!r} ends at byte {self._data_start + end}, past the "
                                             f"end of the file ({size} bytes): the file is truncated")
            entries[name] = (dtype, shape, begin)
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """tensor[index] for a tuple of unit-step slices (missing trailing dims: whole).

        Reads the contiguous run of rows covering the slice of dim 0, then slices the rest.
        """
        dtype, shape, begin = self._entries[name]
        if not shape:
            return np.frombuffer(self._pread(begin, dtype.itemsize), dtype).reshape(())
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        start, stop, step = index[0].indices(shape[0])
        if step != 1:
            raise ValueError("only unit-step slices are supported")
        row = math.prod(shape[1:]) * dtype.itemsize
        rows = max(stop - start, 0)
        buf = self._pread(begin + start * row, rows * row)
        block = np.frombuffer(buf, dtype).reshape((rows, *shape[1:]))
        return block[(slice(None), *index[1:])]

    def _pread(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        view, done = memoryview(buf), 0
        while done < length:
            n = os.preadv(self._fd, [view[done:]], self._data_start + offset + done)
            if n == 0:
                raise SafetensorsFormatError(f"unexpected end of file at byte {self._data_start + offset + done}")
            done += n
        return buf

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        if hasattr(self, "_fd"):
            self.close()
