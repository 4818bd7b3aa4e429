"""The bitsandbytes state-dict layout of a 4-bit weight (`Linear4bit`, transformers), and safetensors files.

For a weight stored under the key P (e.g. "model.layers.0.self_attn.q_proj.weight"):

    P                                      uint8 ((n + 1) // 2, 1)   packed codes
    P.absmax                               float32 (n_blocks,), or uint8 (n_blocks,) if nested
    P.quant_map                            float32 (16,)   the codebook by code
    P.nested_absmax                        float32 (ceil(n_blocks / 256),)          [nested only]
    P.nested_quant_map                     float32 (256,)  the dynamic map          [nested only]
    P.quant_state.bitsandbytes__nf4        uint8 bytes of a JSON object (or __fp4):
        {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [d, k]}
        + "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": <float> if nested,
      written with json.dumps' default separators, keys in that order (as bitsandbytes'
      `QuantState.as_dict(packed=True)` writes them, so the bytes are identical).

quant_map holds bitsandbytes' Python table: for FP4, code 8 is +0.0 there (refpeft's decoder,
like CUDA's, gives -0.0; the tables are otherwise equal). Reading checks every tensor against
the JSON record and refuses anything else (custom maps, other storage dtypes) with a FormatError
naming the key. Files are written atomically (refpeft.io: temporary file, fsync, os.replace).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from refpeft.backend import to_numpy
from refpeft.errors import FormatError
from refpeft.io import read_safetensors, write_safetensors
from refpeft.quant.blockwise import BLOCKSIZES
from refpeft.quant.codebooks import NF4_CODE, QUANT_TYPES, dynamic_map, fp4_code
from refpeft.quant.double import NESTED_BLOCKSIZE, NestedAbsmax
from refpeft.quant.state import STORED_DTYPES, QuantState4bit

QUANT_STATE_KEY = "quant_state.bitsandbytes__"


def stored_quant_map(quant_type: str) -> np.ndarray:
    """The 16-entry `quant_map` tensor bitsandbytes writes for `quant_type`."""
    return np.asarray(NF4_CODE if quant_type == "nf4" else fp4_code(negative_zero=False), dtype=np.float32)


def to_state_dict(state: QuantState4bit, *, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The tensors bitsandbytes stores for one 4-bit weight, keyed under `prefix` (NumPy arrays)."""
    record: dict[str, Any] = {"quant_type": state.quant_type, "blocksize": state.blocksize,
                              "dtype": state.dtype, "shape": list(state.shape)}
    tensors = {prefix: to_numpy(state.packed), f"{prefix}.quant_map": stored_quant_map(state.quant_type)}
    if state.nested:
        tensors[f"{prefix}.absmax"] = to_numpy(state.absmax.codes)
        tensors[f"{prefix}.nested_absmax"] = to_numpy(state.absmax.nested_absmax)
        tensors[f"{prefix}.nested_quant_map"] = np.asarray(dynamic_map(), dtype=np.float32)
        record.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=state.absmax.offset)
    else:
        tensors[f"{prefix}.absmax"] = to_numpy(state.absmax)
    encoded = np.frombuffer(json.dumps(record).encode("utf-8"), dtype=np.uint8).copy()
    tensors[f"{prefix}.{QUANT_STATE_KEY}{state.quant_type}"] = encoded
    return tensors


def quantized_prefixes(tensors: dict[str, Any]) -> list[str]:
    """The keys P of every 4-bit weight in a state dict (those with a P.quant_state.* record)."""
    marker = "." + QUANT_STATE_KEY
    return sorted(key[: key.index(marker)] for key in tensors if marker in key)


def from_state_dict(tensors: dict[str, Any], *, prefix: str = "weight", source: str = "state dict") -> QuantState4bit:
    """Read the 4-bit weight stored under `prefix`; FormatError (naming the key) on any inconsistency."""
    def get(key: str) -> np.ndarray:
        if key not in tensors:
            raise FormatError(f"{source}: key {key!r} is missing")
        return np.asarray(to_numpy(tensors[key]))

    record_keys = [f"{prefix}.{QUANT_STATE_KEY}{q}" for q in QUANT_TYPES if f"{prefix}.{QUANT_STATE_KEY}{q}" in tensors]
    if len(record_keys) != 1:
        raise FormatError(f"{source}: expected one {prefix}.{QUANT_STATE_KEY}nf4/fp4 record, found {len(record_keys)}")
    record = _read_record(get(record_keys[0]), key=record_keys[0], source=source)
    quant_type = record["quant_type"]
    if record_keys[0] != f"{prefix}.{QUANT_STATE_KEY}{quant_type}":
        raise FormatError(f"{source}: {record_keys[0]} records quant_type {quant_type!r}")
    shape = tuple(record["shape"])
    n = math.prod(shape)
    n_blocks = -(-n // record["blocksize"])
    packed = _checked(get(prefix), prefix, np.uint8, ((n + 1) // 2, 1), source)
    quant_map = _checked(get(f"{prefix}.quant_map"), f"{prefix}.quant_map", np.float32, (16,), source)
    if not np.array_equal(quant_map, stored_quant_map(quant_type)):
        raise FormatError(f"{source}: {prefix}.quant_map is not bitsandbytes' {quant_type} table")
    if "nested_offset" in record:
        nested_map = _checked(get(f"{prefix}.nested_quant_map"), f"{prefix}.nested_quant_map", np.float32,
                              (256,), source)
        if not np.array_equal(nested_map, np.asarray(dynamic_map(), dtype=np.float32)):
            raise FormatError(f"{source}: {prefix}.nested_quant_map is not bitsandbytes' dynamic map")
        if record["nested_blocksize"] != NESTED_BLOCKSIZE or record["nested_dtype"] != "float32":
            raise FormatError(f"{source}: {record_keys[0]} has nested_blocksize {record['nested_blocksize']} / "
                              f"nested_dtype {record['nested_dtype']}; only 256 / float32 exist")
        absmax: Any = NestedAbsmax(
            codes=_checked(get(f"{prefix}.absmax"), f"{prefix}.absmax", np.uint8, (n_blocks,), source),
            nested_absmax=_checked(get(f"{prefix}.nested_absmax"), f"{prefix}.nested_absmax", np.float32,
                                   (-(-n_blocks // NESTED_BLOCKSIZE),), source),
            offset=float(np.float32(record["nested_offset"])))
    else:
        absmax = _checked(get(f"{prefix}.absmax"), f"{prefix}.absmax", np.float32, (n_blocks,), source)
    return QuantState4bit(packed=packed, absmax=absmax, shape=shape, dtype=record["dtype"],
                          blocksize=record["blocksize"], quant_type=quant_type)


def save_quantized(path: str | os.PathLike, states: dict[str, QuantState4bit],
                   others: dict[str, np.ndarray] | None = None, *, metadata: dict[str, str] | None = None) -> Path:
    """Write 4-bit weights (keyed by their state-dict names) and other tensors to one safetensors file."""
    tensors = dict(others or {})
    for name, state in states.items():
        tensors.update(to_state_dict(state, prefix=name))
    return write_safetensors(path, tensors, metadata=metadata)


def load_quantized(path: str | os.PathLike) -> tuple[dict[str, QuantState4bit], dict[str, np.ndarray]]:
    """The 4-bit weights of a safetensors file in the bitsandbytes layout, and its other tensors."""
    tensors, _ = read_safetensors(path)
    prefixes = quantized_prefixes(tensors)
    states = {p: from_state_dict(tensors, prefix=p, source=str(path)) for p in prefixes}
    owned = {key for p in prefixes for key in to_state_dict(states[p], prefix=p)}
    return states, {k: v for k, v in tensors.items() if k not in owned}


def _read_record(data: np.ndarray, *, key: str, source: str) -> dict[str, Any]:
    try:
        record = json.loads(bytes(np.asarray(data, dtype=np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{source}: {key} is not a JSON record ({exc})") from None
    problems = []
    if not isinstance(record, dict):
        raise FormatError(f"{source}: {key} holds {type(record).__name__}, expected a JSON object")
    if record.get("quant_type") not in QUANT_TYPES:
        problems.append(f"quant_type {record.get('quant_type')!r}")
    if record.get("blocksize") not in BLOCKSIZES:
        problems.append(f"blocksize {record.get('blocksize')!r}")
    if record.get("dtype") not in STORED_DTYPES:
        problems.append(f"dtype {record.get('dtype')!r}")
    shape = record.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        problems.append(f"shape {shape!r}")
    if problems:
        raise FormatError(f"{source}: {key} has unsupported {', '.join(problems)}")
    return record


def _checked(array: np.ndarray, key: str, dtype: Any, shape: tuple[int, ...], source: str) -> np.ndarray:
    if array.dtype != dtype:
        raise FormatError(f"{source}: {key} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if tuple(array.shape) != shape:
        raise FormatError(f"{source}: {key} has shape {tuple(array.shape)}, expected {shape}")
    return array

