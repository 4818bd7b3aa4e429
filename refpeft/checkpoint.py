"""safetensors checkpoints one tensor at a time: a checked header, memory-mapped reads, streamed writes.

A safetensors file is

    8 bytes    N, the header length (unsigned 64-bit little-endian)
    N bytes    a JSON object: {name: {"dtype": "F32", "shape": [d, k], "data_offsets": [begin, end]},
               ..., "__metadata__": {str: str}}   (optional metadata)
    data       the tensors' bytes, row-major little-endian, at [8 + N + begin, 8 + N + end)

`SafetensorsFile` parses and checks the header once (every defect is a FormatError naming the file
and, where there is one, the tensor) and then maps one tensor at a time with `np.memmap`, so
a checkpoint far larger than memory can be read tensor by tensor: only the pages of the tensor in
use are resident, and they are unmapped when the array is released. The header is read with
plain file reads, never with the `safetensors` package, because its NumPy loader cannot represent
bfloat16 (refpeft maps it to `ml_dtypes.bfloat16`).

`write_safetensors_streaming` writes the header first (every name, dtype and shape is known in
advance) and then each tensor as it is produced, through `refpeft.io.atomic_open`: at most one
produced tensor is held, and an interrupted write leaves no partial file.

Checks made on the header, following the format's own rules: N fits in the file and is at most
100 MB (the reference implementation's limit), the JSON is an object, each entry has a known
dtype, a shape of non-negative integers and offsets whose span is exactly that shape's byte size,
and the entries tile the data section without gap or overlap up to the end of the file (so a
truncated file or trailing garbage is refused).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from refpeft.errors import DTypeError, FormatError
from refpeft.io import atomic_open

# safetensors dtype names -> NumPy dtypes (little-endian); bfloat16 and the float8s via ml-dtypes.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: str               # a safetensors dtype name ("F32", "BF16", ...)
    shape: tuple[int, ...]
    begin: int               # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors name of a NumPy dtype; FormatError for one the format cannot store."""
    for code, candidate in DTYPES.items():
        if np.dtype(dtype) == candidate:
            return code
    raise FormatError(f"dtype {dtype} cannot be stored in a safetensors file")


class SafetensorsFile:
    """A safetensors file opened for reading one tensor at a time (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such file")
        self.file_size = self.path.stat().st_size
        header = self._read_header()
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise FormatError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = metadata
        self.tensors: dict[str, TensorInfo] = {name: self._entry(name, spec) for name, spec in header.items()}
        self._check_tiling()

    def keys(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return sorted(self.tensors, key=lambda name: (self.tensors[name].begin, self.tensors[name].end))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise FormatError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only array mapped from the file (no copy; unmapped when released)."""
        entry = self.info(name)
        dtype = DTYPES[entry.dtype]
        if entry.nbytes == 0:
            return np.zeros(entry.shape, dtype=dtype)
        mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + entry.begin,
                           shape=(math.prod(entry.shape),))
        return mapped.reshape(entry.shape)

    def read_float(self, name: str) -> np.ndarray:
        """A floating tensor as a NumPy array in memory; bfloat16 becomes float32 (exactly), as
        refpeft emulates it (refpeft.backend). Non-floating tensors are a DTypeError."""
        entry = self.info(name)
        if entry.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{self.path}: tensor {name!r} has dtype {entry.dtype}; expected one of "
                              f"{', '.join(FLOAT_DTYPES)}")
        array = self.read(name)
        return np.array(array, dtype=np.float32 if entry.dtype == "BF16" else array.dtype)

    def _read_header(self) -> dict:
        if self.file_size < 8:
            raise FormatError(f"{self.path}: truncated ({self.file_size} bytes; a safetensors file starts "
                              "with an 8-byte header length)")
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES or 8 + length > self.file_size:
                raise FormatError(f"{self.path}: header length {length} does not fit the file "
                                  f"({self.file_size} bytes): truncated or not a safetensors file")
            raw = f.read(length)
        self.data_start = 8 + length
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{self.path}: corrupt header, not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: corrupt header, expected a JSON object")
        return header

    def _entry(self, name: str, spec: object) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{where}: header entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in DTYPES:
            raise FormatError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(n) is int and n >= 0 for n in offsets) or offsets[0] > offsets[1]):
            raise FormatError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        size = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != size:
            raise FormatError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but dtype {dtype} "
                              f"and shape {tuple(shape)} need {size}")
        return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])

    def _check_tiling(self) -> None:
        position = 0
        for name in self.keys():
            entry = self.tensors[name]
            if entry.begin != position:
                what = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
                raise FormatError(f"{self.path}: tensor {name!r} at data offset {entry.begin} {what} "
                                  f"(expected offset {position})")
            position = entry.end
        data_size = self.file_size - self.data_start
        if position != data_size:
            problem = "truncated" if position > data_size else "has trailing bytes"
            raise FormatError(f"{self.path}: {problem}: the header describes {position} data bytes, "
                              f"the file holds {data_size}")


def write_safetensors_streaming(path: str | os.PathLike, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                                produce: Callable[[str], np.ndarray], *,
                                metadata: dict[str, str] | None = None,
                                progress: Callable[[str, int], None] | None = None) -> Path:
    """Write a safetensors file whose tensors are made one at a time, atomically.

    entries: (name, safetensors dtype, shape) in the order to store them. `produce(name)` returns
    that tensor; it must have the declared dtype and shape (FormatError otherwise, and no file is
    left behind). `progress(name, nbytes)` is called after each tensor is written.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    position = 0
    planned = []
    for name, code, shape in entries:
        if code not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r}: unknown dtype {code!r}")
        size = math.prod(shape) * DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [position, position + size]}
        planned.append((name, code, tuple(shape)))
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # pad so the data section starts 8-byte aligned, as safetensors does
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, code, shape in planned:
            array = produce(name)
            if array.dtype != DTYPES[code] or tuple(array.shape) != shape:
                raise FormatError(f"{path}: tensor {name!r} was produced as {array.dtype} {tuple(array.shape)}, "
                                  f"declared {code} {shape}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            if progress is not None:
                progress(name, array.nbytes)
    return Path(path)
