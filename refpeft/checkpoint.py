"""safetensors checkpoints one tensor at a time: a checked header, memory-mapped reads, streamed writes.

A safetensors file is

    8 bytes    N, the header length (unsigned 64-bit little-endian)
    N bytes    a JSON object: {name: {"dtype": "F32", "shape": [d, k], "data_offsets": [begin, end]},
               ..., "__metadata__": {str: str}}   (optional metadata)
    data       the tensors' bytes, row-major little-endian, at [8 + N + begin, 8 + N + end)

`SafetensorsFile` parses and checks the header once (every defect is a FormatError naming the file
and, where there is one, the tensor) and then maps one tensor at a time with `np.memmap`, so
a checkpoint far larger than memory can be read tensor by tensor: only the pages of the tensor in
use are resident, and they are unmapped when the array is released. The header is parsed here
rather than by the `safetensors` package so that each tensor's byte range is known (to map just
it) and each defect is named with its tensor; bfloat16 and the float8s map to ml_dtypes types.

`write_safetensors_streaming` writes the header first (every name, dtype and shape is known in
advance) and then each tensor as it is produced, through `refpeft.io.atomic_open`: at most one
produced tensor is held, and an interrupted write leaves no partial file.

Checks made on the header, following the format's own rules: N fits in the file and is at most
100 MB (the reference implementation's limit), the JSON is an object, each entry has a known
dtype, a shape of non-negative integers that NumPy can make and offsets whose span is exactly that
shape's byte size, and the entries tile the data section without gap or overlap up to the end of
the file (so a truncated file or trailing garbage is refused).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import ConfigError, DTypeError, FormatError, NonFiniteError, RefpeftError, ShapeError
from refpeft.io import atomic_open, check_outputs, not_safetensors, parse_json
from refpeft.methods.linear import LinearShape, linear_shape

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
MERGE_BLOCK_ELEMENTS = 2**20  # float64 entries per block of merged rows (8 MiB)
MAX_HEADER_BYTES = 100_000_000
# The largest shape NumPy makes: 32 dimensions (NumPy 2 allows 64) and a product of the non-zero
# sizes times the item size that fits an intp (an empty array may not have a size past it either).
MAX_NDIM, MAX_ARRAY_BYTES = 32, 2**63 - 1


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
        if entry.nbytes == 0:  # nothing to map
            empty = np.zeros(entry.shape, dtype=dtype)
            empty.setflags(write=False)
            return empty
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

    def linear_shapes(self, paths: Iterable[str], *, fan_in_fan_out: bool = False) -> dict[str, LinearShape]:
        """Sizes (k, d) of the linear layers `paths` (weights "<path>.weight", read from the header only).

        Paths without a weight are left out (the caller names what it needed); a weight that is
        not 2-D is a ShapeError naming it."""
        shapes = {}
        for path in paths:
            key = f"{path}.weight"
            if key in self.tensors:
                shape = self.tensors[key].shape
                if len(shape) != 2:
                    raise ShapeError(f"{self.path}: {key} has shape {shape}; a linear layer's weight is 2-D")
                # linear_shape reads only `.shape`: the weight itself is not loaded.
                shapes[path] = linear_shape(SimpleNamespace(shape=shape), fan_in_fan_out=fan_in_fan_out)
        return shapes

    def _read_header(self) -> dict:
        if self.file_size < 8:
            raise FormatError(f"{self.path}: truncated ({self.file_size} bytes; a safetensors file starts "
                              "with an 8-byte header length)")
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES or 8 + length > self.file_size:
                raise not_safetensors(self.path, f"header length {length} does not fit the file "
                                      f"({self.file_size} bytes): truncated or not a safetensors file")
            raw = f.read(length)
        self.data_start = 8 + length
        header = parse_json(raw, source=f"{self.path}: corrupt header")
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
        if len(shape) > MAX_NDIM or math.prod(n for n in shape if n) * DTYPES[dtype].itemsize > MAX_ARRAY_BYTES:
            raise FormatError(f"{where}: shape {shape!r} is larger than an array can be (at most {MAX_NDIM} "
                              "dimensions, and 2^63 - 1 bytes counting only its non-zero sizes)")
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
            nbytes = _write_one(f, path, name, code, shape, produce)   # the tensor is gone before the next is made
            if progress is not None:
                progress(name, nbytes)
    return Path(path)


def _write_one(f: Any, path: Any, name: str, code: str, shape: tuple[int, ...],
               produce: Callable[[str], np.ndarray | Iterator[np.ndarray]]) -> int:
    """Produce tensor `name` (an array, or its consecutive row-major pieces one at a time), check it
    against its declaration, write its bytes; the byte count."""
    produced = produce(name)
    pieces = [produced] if isinstance(produced, np.ndarray) else produced
    written, wanted = 0, math.prod(shape) * DTYPES[code].itemsize
    for piece in pieces:
        if piece.dtype != DTYPES[code] or (isinstance(produced, np.ndarray) and tuple(piece.shape) != shape):
            raise FormatError(f"{path}: tensor {name!r} was produced as {piece.dtype} {tuple(piece.shape)}, "
                              f"declared {code} {shape}")
        f.write(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
        written += piece.nbytes
    if written != wanted:
        raise FormatError(f"{path}: tensor {name!r} was produced with {written} bytes, declared {code} {shape}")
    return written


@dataclass(frozen=True)
class MergeReport:
    """What `merge_into_checkpoint` wrote."""

    tensors: int             # tensors in the output (as many as in the base)
    merged_weights: int      # adapted weights replaced by merged ones
    changed_biases: int      # biases changed (lora_bias added, or trained biases written)
    bytes_written: int
    largest_merged_bytes: int  # the largest adapted weight, in the checkpoint's dtype
    saved_tensors: int = 0   # tensors replaced by the adapter's saved modules (PEFT's modules_to_save)


def merge_into_checkpoint(adapter: Adapter, base: SafetensorsFile, out: str | os.PathLike, *,
                          progress: Callable[[str, int], None] | None = None,
                          block_elements: int = MERGE_BLOCK_ELEMENTS) -> MergeReport:
    """Write `base` with `adapter` merged into it, one tensor at a time, atomically.

    Every tensor of the base is copied in file order, except:
      <p>.weight  of an adapted module p: the merged weight (its method's merge: lora_merge, dora_merge,
                  vera_merge, through the method table), computed in float64 and rounded once to the base's
                  dtype (bfloat16 through float32, as ml_dtypes and torch both round float64 to it);
      <p>.bias    the trained bias from Adapter.base_biases (PEFT's bias="lora_only"/"all"), plus
                  s * lora_B.bias when the module has a lora_bias (PEFT's merge does the same);
      <t>         a tensor of a saved module (Adapter.saved_modules, PEFT's modules_to_save): the trained
                  copy, rounded once to the base's dtype, as merge_and_unload keeps the copy. A tied
                  checkpoint (an embedding and no lm_head.weight) is refused for a saved lm_head (it has
                  no head tensor to write) and for a saved embedding (writing it would move the tied
                  head too, which PEFT's copy leaves on the base embedding).
    Memory: one tensor at a time, never the whole checkpoint. An adapted weight is merged in blocks
    of output rows (`block_elements` float64 entries each: row i of the merged weight depends
    only on row i of W0 and B, of m and lambda_b, and on all of A), so besides the blocks only the
    mapped base weight and the merged one in the checkpoint's dtype are held: about twice the
    layer. Errors name the base file and the key.
    """
    target = Path(out)
    check_outputs([target], inputs=[base.path])
    weights = {f"{path}.weight": path for path in adapter.modules}
    biases = {f"{path}.bias": path for path, m in adapter.modules.items()
              if m.bias is not None or (m.spec.merge_bias is not None and f"{path}.bias" in base)}
    biases.update({f"{path}.bias": path for path in adapter.base_biases})
    saved = adapter.saved_modules
    if adapter.token_values is not None:
        raise ConfigError("the adapter trains embedding rows (trainable tokens), which merging does not write yet")
    tied = "lm_head.weight" not in base and "model.embed_tokens.weight" in base
    if tied and ("lm_head.weight" in saved or "model.embed_tokens.weight" in saved):
        raise FormatError(f"{base.path}: the checkpoint's output layer is tied to its embedding (it stores no "
                          "lm_head.weight), but the adapter saves a trained "
                          + ("lm_head, which has no tensor of its own here" if "lm_head.weight" in saved else
                             "embedding, and writing it would change the tied head too")
                          + "; merge into an untied checkpoint (tie_word_embeddings false, with lm_head.weight)")
    for key in (*weights, *biases, *saved):
        if key not in base:
            why = "the adapter changes this bias" if key in biases else "the adapter adapts this layer" \
                if key in weights else "the adapter saves this module's tensor"
            raise FormatError(f"{base.path}: tensor {key!r} is missing ({why})")
        if key in saved and tuple(saved[key].shape) != base.info(key).shape:
            raise ShapeError(f"{base.path}: {key} has shape {base.info(key).shape}, the adapter's saved copy "
                             f"{tuple(saved[key].shape)}")
    for key in (*weights, *biases, *saved):
        if base.info(key).dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{base.path}: {key} has dtype {base.info(key).dtype}; merging needs a floating weight")

    def named(key: str, pieces: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        try:
            yield from pieces
        except RefpeftError as exc:
            raise type(exc)(f"{base.path}: {key}: {exc}") from None

    def produce(key: str) -> np.ndarray | Iterator[np.ndarray]:
        stored = base.read(key)
        if key not in weights and key not in biases and key not in saved:
            return stored
        try:
            if key in saved:
                return _rounded(np.asarray(saved[key], dtype=np.float64), stored.dtype)
            if key in weights:
                merged = _merged_in_blocks(adapter, weights[key], stored, block_elements=block_elements)
                return merged if isinstance(merged, np.ndarray) else named(key, merged)
            return _rounded(merged_bias(adapter, biases[key], np.asarray(stored, dtype=np.float64)), stored.dtype)
        except RefpeftError as exc:
            raise type(exc)(f"{base.path}: {key}: {exc}") from None

    written = 0

    def count(name: str, nbytes: int) -> None:
        nonlocal written
        written += nbytes
        if progress is not None:
            progress(name, nbytes)

    entries = [(key, base.info(key).dtype, base.info(key).shape) for key in base.keys()]
    write_safetensors_streaming(target, entries, produce, metadata=base.metadata, progress=count)
    return MergeReport(tensors=len(entries), merged_weights=len(weights), changed_biases=len(biases),
                       bytes_written=written,
                       largest_merged_bytes=max(base.info(key).nbytes for key in weights) if weights else 0,
                       saved_tensors=len(saved))


def merged_weight(module: ModuleAdapter, W0: np.ndarray, *, shared: Mapping[str, Any] | None = None,
                  rows: slice = slice(None)) -> np.ndarray:
    """Output rows `rows` of one module's merged weight, in W0's layout and float64 (its method's merge).

    W0 holds just those rows (columns with fan_in_fan_out), already float64; the tensors whose
    first axis is the outputs (the method table's `per_output`: B's rows, m, lambda_b, vera_B's
    rows) are sliced to match."""
    spec = module.spec
    if not spec.mergeable:
        raise ConfigError(f"{spec.name} adapters do not fold into the weight; they cannot be merged")

    def part(name: str, a: Any) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)       # a length-1 axis 0 broadcasts (IA3's input-side l, (1, k))
        return a[rows] if name in spec.per_output and a.shape[0] != 1 else a

    tensors = {name: part(name, a) for name, a in module.tensors.items()}
    return spec.merge(W0, module.replace(**tensors), shared={n: part(n, a) for n, a in (shared or {}).items()})


def _merged_in_blocks(adapter: Adapter, path: str, stored: np.ndarray, *,
                      block_elements: int) -> np.ndarray | Iterator[np.ndarray]:
    """The merged weight of module `path` in the stored dtype, computed block of output rows by block:
    for a (d, k) weight the blocks themselves, in file order (the whole merged weight never exists);
    for a fan_in_fan_out (k, d) one, whose row blocks are column blocks of the file, the assembled array."""
    module = adapter.modules[path]
    fif = module.fan_in_fan_out
    d, k = (stored.shape[1], stored.shape[0]) if fif else stored.shape
    # At least r rows per block: refpeft.methods.lora refuses a factor B with fewer rows than its rank.
    step = max(module.r or 1, block_elements // max(k, 1))
    count = max(1, d // step)
    bounds = [d * i // count for i in range(count + 1)]  # `count` blocks of at least `step` rows

    def block(rows: slice) -> np.ndarray:
        where = (slice(None), rows) if fif else (rows, slice(None))
        merged = merged_weight(module, np.asarray(stored[where], dtype=np.float64), shared=adapter.shared, rows=rows)
        return _rounded(merged, stored.dtype)

    blocks = (block(slice(start, stop)) for start, stop in zip(bounds[:-1], bounds[1:]))
    if not fif:
        return blocks
    merged = np.empty(stored.shape, dtype=stored.dtype)
    for (start, stop), values in zip(zip(bounds[:-1], bounds[1:]), blocks):
        merged[:, start:stop] = values
    return merged


def _rounded(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 values in the checkpoint's dtype; NonFiniteError if they overflow it."""
    rounded = values.astype(dtype)
    bad = int(np.count_nonzero(~np.isfinite(rounded)))
    if bad:
        raise NonFiniteError(f"the merged values overflow {np.dtype(dtype).name} ({bad} non-finite)")
    return rounded


def merged_bias(adapter: Adapter, path: str, b0: np.ndarray) -> np.ndarray:
    """The bias of layer `path` after merging: the trained one (if any) plus s * lora_B.bias (if any), then
    its method's `merge_bias` (IA3's output scaling multiplies it by l)."""
    bias = np.asarray(adapter.base_biases[path], dtype=np.float64) if path in adapter.base_biases else b0
    module = adapter.modules.get(path)
    if module is not None and module.bias is not None:
        bias = bias + np.asarray(module.bias, dtype=np.float64) * module.scaling
    if module is not None and module.spec.merge_bias is not None:          # IA3's output scaling: l * b
        bias = module.spec.merge_bias(bias, module.replace(**{n: np.asarray(t, dtype=np.float64)
                                                              for n, t in module.tensors.items()}))
    if bias.shape != b0.shape:
        raise ShapeError(f"the adapter's bias has shape {bias.shape}, the base's {b0.shape}")
    return bias
