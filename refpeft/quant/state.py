"""A 4-bit quantised weight (bitsandbytes' `QuantState`): quantise a weight, dequantise it, count its bytes.

    state = quantize_4bit(W, quant_type="nf4", blocksize=64, double_quant=True)
    W_hat = dequantize_4bit(state)          # W's shape and dtype

The steps are those of refpeft.quant.blockwise (codes and packing) and refpeft.quant.double (the
8-bit absmax); `rounding=` picks the bitsandbytes implementation reproduced ("bnb-cuda" default,
"bnb-cpu"), and applies to both levels. The weight's dtype (float32, float16 or bfloat16) is
recorded, as bitsandbytes does, and restored on dequantisation by a round-to-nearest cast of the
float32 products. bfloat16 on NumPy is emulated: float32 arrays holding bfloat16 values (pass
`dtype="bfloat16"`; values that are not bfloat16 numbers are refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refpeft.backend import dtype_name, float_dtype, namespace, round_to
from refpeft.errors import DTypeError
from refpeft.quant.blockwise import dequantize_blockwise_4bit, quantize_blockwise_4bit
from refpeft.quant.double import NESTED_BLOCKSIZE, NestedAbsmax, dequantize_absmax, quantize_absmax

STORED_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantState4bit:
    """Everything needed to rebuild a weight: packed codes, absmax (plain or nested), metadata."""

    packed: Any                    # uint8 ((n + 1) // 2, 1)
    absmax: Any | NestedAbsmax     # float32 (n_blocks,), or its double quantisation
    shape: tuple[int, ...]
    dtype: str                     # the weight's dtype: float32, float16 or bfloat16
    blocksize: int
    quant_type: str                # nf4 or fp4

    @property
    def nested(self) -> bool:
        return isinstance(self.absmax, NestedAbsmax)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def quantize_4bit(x: Any, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                  rounding: str = "bnb-cuda", dtype: str | None = None) -> QuantState4bit:
    """Quantise weight `x` blockwise to NF4/FP4, optionally double-quantising its absmax."""
    xp = namespace(x)
    stored = _stored_dtype(x, dtype, xp=xp)
    packed, absmax = quantize_blockwise_4bit(x, quant_type=quant_type, blocksize=blocksize, rounding=rounding)
    if double_quant:
        absmax = quantize_absmax(absmax, rounding=rounding)
    return QuantState4bit(packed=packed, absmax=absmax, shape=tuple(x.shape), dtype=stored,
                          blocksize=blocksize, quant_type=quant_type)


def absmax_values(state: QuantState4bit) -> Any:
    """The float32 absmax of every block (dequantising a nested absmax)."""
    return dequantize_absmax(state.absmax) if state.nested else state.absmax


def dequantize_4bit(state: QuantState4bit, *, dtype: str | None = None) -> Any:
    """The weight rebuilt from `state` in its shape: the float32 products rounded once to `dtype`
    (default: the stored dtype; bitsandbytes' matmul asks for its compute dtype). bfloat16 values
    come in float32 arrays on every namespace (refpeft.backend's policy)."""
    dtype = state.dtype if dtype is None else dtype
    if dtype not in STORED_DTYPES:
        raise DTypeError(f"dequantize to float32, float16 or bfloat16, not {dtype!r}")
    values = dequantize_blockwise_4bit(state.packed, absmax_values(state), shape=state.shape,
                                       quant_type=state.quant_type, blocksize=state.blocksize)
    xp = namespace(values)
    if dtype == "float32":
        return values
    if dtype == "bfloat16":
        return round_to(values, "bfloat16", xp=xp)
    return xp.astype(values, float_dtype(dtype, xp=xp))


def stored_bytes(state: QuantState4bit) -> dict[str, int]:
    """Bytes of each per-weight tensor bitsandbytes stores (codes, absmax, nested absmax); the
    16- and 256-entry maps and the JSON record are per-tensor constants, counted separately."""
    sizes = {"weight": (state.numel + 1) // 2}
    if state.nested:
        sizes["absmax"] = state.absmax.codes.shape[0]
        sizes["nested_absmax"] = 4 * state.absmax.nested_absmax.shape[0]
    else:
        sizes["absmax"] = 4 * state.absmax.shape[0]
    return sizes


def bits_per_parameter(state: QuantState4bit) -> float:
    """8 * (stored per-weight bytes) / parameters: 4.5 at block 64, 4.127 with double quantisation."""
    return 8 * sum(stored_bytes(state).values()) / state.numel


def nominal_bits_per_parameter(blocksize: int, *, double_quant: bool) -> float:
    """4 + 32/bs, or 4 + 8/bs + 32/(bs * 256) with double quantisation (ignoring partial blocks)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


def _stored_dtype(x: Any, dtype: str | None, *, xp: Any) -> str:
    actual = dtype_name(x.dtype, xp=xp)
    if actual not in STORED_DTYPES:
        raise DTypeError(f"x has dtype {x.dtype}; bitsandbytes quantises float32, float16 or bfloat16 weights")
    if dtype is None or dtype == actual:
        return actual
    if dtype != "bfloat16" or actual != "float32":
        raise DTypeError(f"dtype={dtype!r} does not describe x of dtype {x.dtype} (only float32 arrays may "
                         "hold emulated bfloat16)")
    if not bool(xp.all(round_to(x, "bfloat16", xp=xp) == x)):
        raise DTypeError("dtype='bfloat16' but x holds values that are not bfloat16 numbers")
    return "bfloat16"
