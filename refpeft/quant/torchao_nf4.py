"""torchao's NF4Tensor (`to_nf4`, torchao 0.18): NF4 with argmin rounding and int8 double quantisation.

torchao computes everything in the weight's dtype D (float32, float16 or bfloat16): every
operation below is one float32 operation rounded to D (torch's CPU kernels for D = float16 and
bfloat16 compute in float32 and round each result), written r(.). With n = numel, bs the block
size and sbs the scaler block size (torchao requires bs | n, sbs | n / bs, n even, ndim <= 2):

    absmax[b]  = max |x| over block b                             # (n/bs,), exact
    mean       = r(f32(torch_sum(absmax) / (n/bs)))               # torch's float32 sum order
    v          = r(absmax - mean)                                 # (n/bs,)
    s[c]       = max |v| over scaler block c                      # (n/bs/sbs,)
    factor[c]  = r(r(1 / r(2 s[c])) * 256)                        # 256 / t is t.reciprocal() * 256
    q          = int8(clamp(round_half_even(r(v * factor)), -128, 127))
    xn         = r(x / absmax[b])                                 # a true division
    code       = argmin_j r(|xn - T[j]|), the first j on ties     # T = TORCHAO_NF4_CODE in D
    byte i     = code[2i] << 4 | code[2i+1]                       # (n/2,) uint8

Dequantising: scaler[b] = r(r(q[b] / factor[c]) + mean); value = r(T[code] * scaler[b]), in D.

Numeric choices, all torchao's: the 4-decimal table (TORCHAO_NF4_CODE, not NF4_CODE), nearest
code by distance (not bitsandbytes' thresholds; ties go to the lower code), an affine int8 map
for the scalers (not bitsandbytes' dynamic map). Edge cases as torch on x86: an all-zero block
gives 0/0 = NaN, every distance NaN and code 0 (argmin returns the first NaN); a scaler block
whose v are all 0 gives factor inf, 0 * inf = NaN and q = 0 (x86 converts NaN to int8 0).
The mean is torch's one-thread order (refpeft.quant.torch_sum); with 32,768 blocks or more
torchao on T threads sums in another order: pass `threads=T`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, dtype_name, namespace, round_to
from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.quant.blockwise import pack_nibbles, split_blocks, unpack_nibbles
from refpeft.quant.codebooks import TORCHAO_NF4_CODE, f32
from refpeft.quant.torch_sum import torch_cpu_mean

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TorchaoNF4:
    """The tensors of a torchao NF4Tensor (values of dtype D held in float32 arrays)."""

    quantized_data: Any       # uint8 (n/2,)
    quantized_scalers: Any    # int8 (n/bs,)
    quantization_factor: Any  # D (n/bs/sbs,)
    scaler_mean: float        # a D value
    shape: tuple[int, ...]
    dtype: str                # D
    block_size: int
    scaler_block_size: int


def quantize_nf4_torchao(x: Any, *, block_size: int = 64, scaler_block_size: int = 256, dtype: str | None = None,
                         threads: int = 1) -> TorchaoNF4:
    """torchao's `to_nf4(x, block_size, scaler_block_size)` (see the module docstring).

    `dtype` names D when a float32 array holds bfloat16 values (NumPy has no bfloat16)."""
    xp = namespace(x)
    check_float_array("x", x, xp=xp)
    d = dtype or dtype_name(x.dtype, xp=xp)
    if d not in DTYPES:
        raise DTypeError(f"x has dtype {d}; torchao's NF4 takes float32, float16 or bfloat16")
    n = math.prod(x.shape)
    _check_shape(tuple(x.shape), block_size, scaler_block_size)
    r = _rounder(d, xp=xp)
    blocks = xp.reshape(xp.astype(x, xp.float32), (-1, block_size))                       # (nb, bs)
    absmax = xp.max(xp.abs(blocks), axis=1)                                                # (nb,)
    mean = f32(float(r(xp.asarray(torch_cpu_mean(absmax, threads=threads), dtype=xp.float32))))
    v = r(absmax - xp.asarray(mean, dtype=xp.float32))
    scaler_blocks = split_blocks(v, scaler_block_size, xp=xp)                              # (nc, sbs)
    with _quiet():
        factor = r(r(1.0 / r(2.0 * xp.max(xp.abs(scaler_blocks), axis=1))) * 256.0)       # (nc,)
        scaled = xp.round(r(scaler_blocks * factor[:, None]))
        scaled = xp.where(xp.isnan(scaled), xp.zeros_like(scaled), xp.clip(scaled, -128.0, 127.0))
        xn = r(blocks / absmax[:, None])
        table = _table(d, xp=xp)                                                           # (16,)
        distance = r(xp.abs(xp.reshape(xn, (-1, 1)) - table[None, :]))                    # (n, 16)
    nan = xp.isnan(distance[:, 0])  # every distance of a NaN is NaN: torch's argmin gives 0
    codes = xp.where(nan, xp.zeros(n, dtype=xp.int64),
                     xp.argmin(xp.where(xp.isnan(distance), xp.zeros_like(distance), distance), axis=1))
    return TorchaoNF4(quantized_data=xp.reshape(pack_nibbles(codes, xp=xp), (-1,)),
                      quantized_scalers=xp.astype(xp.reshape(scaled, (-1,)), xp.int8),
                      quantization_factor=factor, scaler_mean=mean, shape=tuple(x.shape), dtype=d,
                      block_size=block_size, scaler_block_size=scaler_block_size)


def dequantize_nf4_torchao(state: TorchaoNF4) -> Any:
    """torchao's `get_original_weight()`: D values (in a float32 array) of the original shape."""
    xp = namespace(state.quantized_data, state.quantization_factor)
    if state.quantized_data.dtype != xp.uint8 or state.quantized_scalers.dtype != xp.int8:
        raise DTypeError("quantized_data must be uint8 and quantized_scalers int8")
    _check_shape(state.shape, state.block_size, state.scaler_block_size)
    r = _rounder(state.dtype, xp=xp)
    q = split_blocks(xp.astype(state.quantized_scalers, xp.float32), state.scaler_block_size, xp=xp)
    with _quiet():
        scalers = r(xp.reshape(r(q / state.quantization_factor[:, None]), (-1,))
                    + xp.asarray(state.scaler_mean, dtype=xp.float32))                     # (nb,)
        codes = xp.astype(unpack_nibbles(state.quantized_data, xp=xp), xp.int32)
        values = xp.reshape(xp.take(_table(state.dtype, xp=xp), codes), (-1, state.block_size))
        return xp.reshape(r(values * scalers[:, None]), state.shape)


def _check_shape(shape: tuple[int, ...], block_size: int, scaler_block_size: int) -> None:
    for name, size in (("block_size", block_size), ("scaler_block_size", scaler_block_size)):
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"{name} must be a positive int, got {size!r}")
    n = math.prod(shape)
    if len(shape) > 2 or n == 0 or n % 2 or n % block_size or (n // block_size) % scaler_block_size:
        raise ShapeError(f"torchao's NF4 takes 1-D or 2-D tensors whose size is even, a multiple of "
                         f"block_size ({block_size}) and of block_size * scaler_block_size "
                         f"({block_size * scaler_block_size}); got shape {shape}")


def _rounder(d: str, *, xp: Any):
    if d == "float32":
        return lambda a: a
    return lambda a: round_to(a, d, xp=xp)


def _table(d: str, *, xp: Any) -> Any:
    return _rounder(d, xp=xp)(xp.asarray([f32(c) for c in TORCHAO_NF4_CODE], dtype=xp.float32))


def _quiet():
    import numpy as np  # overflow to inf and 0/0 = NaN are torchao's semantics here, not errors

    return np.errstate(over="ignore", invalid="ignore", divide="ignore")
