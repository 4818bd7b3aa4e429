"""Double quantisation: the float32 absmaxes of a 4-bit weight, stored as 8-bit codes (QLoRA, section 3).

    offset       = mean(absmax)                                     # one float32 number
    v            = f32(absmax - offset)                             # (n_blocks,)
    nested block = 256 consecutive v's (the last may be partial)
    nested_absmax[c] = max |v| over nested block c                  # float32
    vn           = v * f32(1 / nested_absmax[c])
    code         = nearest value of the signed 8-bit dynamic map (codebooks.dynamic_map)
    absmax'      = f32(f32(map[code] * nested_absmax[c]) + offset)  # dequantised, two roundings

Numeric choices:
- offset: bitsandbytes takes `absmax.mean()` in float32, whose summation order is the device's.
  "bnb-cpu" reproduces torch's CPU order (refpeft.quant.torch_sum.torch_cpu_mean, identical on
  every x86 CPU) with one thread. That is bitsandbytes' offset, bit for bit, whenever
  n_blocks < 32768 (torch sums those in one piece) or torch ran single-threaded; for larger
  absmaxes torch splits the sum across its T threads, so pass
  `offset=torch_cpu_mean(absmax, threads=T)` to match a T-thread run (conformance/FINDINGS.md F-7).
  If that float32 sum overflows (bitsandbytes stores offset = inf, FINDINGS F-12) refpeft keeps
  the float64 mean below instead, so the weight stays recoverable.
  "bnb-cuda": CUDA's reduction tree is not reproduced; refpeft uses the float32 value nearest
  the mean accumulated in float64 (almost always the correctly rounded mean).
  An explicit `offset=` reproduces any stored state; dequantisation always reads the stored
  offset, so it is exact either way.
- the nearest code, by `rounding=`:
  "bnb-cuda": the CUDA kernel's search (`dQuantize`): seven halving steps from index 127 compare
  vn > map[pivot]; the final pivot is always even, and the value goes to whichever neighbour lies
  past the float32 midpoint f32((a + b) * 0.5), a value exactly on the midpoint staying with the
  pivot (so ties go to the even index). An all-zero nested block computes 0 * inf = NaN and gets
  code 0 (map[0] = -0.99296875, times 0: the absmax comes back as the offset); when
  0 < nested_absmax <= 2^-128 the reciprocal overflows, v * inf saturates to code 0 or 255 and
  zeros (NaN) get code 0.
  "bnb-cpu": bitsandbytes 0.50's C code: vn clamped to [-1, 1] goes to one of 65,536 bins,
  i = trunc(f32(f32(f32(f32(vn + 1) * 0.5) * 65535) + 0.5) (fusing the last multiply-add, as
  GCC may, changes no bin: checked over every float32 in [2^-12, 1]), and a table built once from the bin values f32(-1 + f32(2i / 65535)) gives the code:
  table[i] = #{midpoints m : m < bin value i}. This is an approximation of the nearest code (a
  handful of the 65,536 bins round one step off, see conformance/FINDINGS.md) reproduced exactly.
  An all-zero nested block gets code 0; overflowing reciprocals behave as under "bnb-cuda".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace, require_shape
from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.quant.blockwise import RECIPROCAL_OVERFLOW, split_blocks
from refpeft.quant.codebooks import ROUNDINGS, dynamic_map, midpoints
from refpeft.quant.torch_sum import torch_cpu_mean

NESTED_BLOCKSIZE = 256
_CPU_BINS = 65536


@dataclass(frozen=True)
class NestedAbsmax:
    """A double-quantised absmax: 8-bit codes, one float32 scale per 256 codes, and the offset."""

    codes: Any          # uint8 (n_blocks,)
    nested_absmax: Any  # float32 (ceil(n_blocks / 256),)
    offset: float       # a float32 value


def quantize_absmax(absmax: Any, *, rounding: str = "bnb-cuda", offset: float | None = None) -> NestedAbsmax:
    """Double-quantise a float32 absmax vector (see the module docstring for every step)."""
    xp = namespace(absmax)
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    if absmax.dtype != xp.float32:
        raise DTypeError(f"absmax has dtype {absmax.dtype}, expected float32")
    check_float_array("absmax", absmax, xp=xp, shape=(None,))
    if absmax.shape[0] == 0:
        raise ShapeError("absmax is empty: nothing to quantise")
    if offset is None:
        offset = torch_cpu_mean(absmax) if rounding == "bnb-cpu" else math.inf
        if not math.isfinite(offset):  # bnb-cuda, or torch's float32 sum overflowed (F-12)
            offset = float(xp.astype(xp.mean(xp.astype(absmax, xp.float64)), xp.float32))
    n = absmax.shape[0]
    v = split_blocks(absmax - xp.asarray(offset, dtype=xp.float32), NESTED_BLOCKSIZE, xp=xp)  # (nc, 256)
    nested_absmax = xp.max(xp.abs(v), axis=1)                                               # (nc,)
    overflow = (nested_absmax <= RECIPROCAL_OVERFLOW)[:, None]     # 1/s = inf, as in blockwise
    vn = v * (1.0 / xp.where(overflow[:, 0], xp.ones_like(nested_absmax), nested_absmax))[:, None]
    infinite = xp.where(v > 0, xp.asarray(2.0, dtype=xp.float32), xp.asarray(-2.0, dtype=xp.float32))
    vn = xp.where(overflow, infinite, vn)                          # v * inf: +-2 lies beyond the map
    nearest = _nearest_cuda if rounding == "bnb-cuda" else _nearest_cpu
    codes = xp.reshape(nearest(xp.reshape(vn, (-1,)), xp=xp), vn.shape)           # take() wants 1-D
    codes = xp.where(overflow & (v == 0), xp.zeros_like(codes), codes)            # 0 * inf = NaN: code 0
    return NestedAbsmax(codes=xp.reshape(codes, (-1,))[:n], nested_absmax=nested_absmax, offset=offset)


def dequantize_absmax(nested: NestedAbsmax) -> Any:
    """absmax' = f32(f32(map[code] * nested_absmax[i // 256]) + offset), float32 (n_blocks,)."""
    xp = namespace(nested.codes, nested.nested_absmax)
    if nested.codes.dtype != xp.uint8:
        raise DTypeError(f"nested codes have dtype {nested.codes.dtype}, expected uint8")
    n = nested.codes.shape[0]
    require_shape("nested_absmax", nested.nested_absmax, (-(-n // NESTED_BLOCKSIZE),))
    index = xp.astype(xp.reshape(nested.codes, (-1,)), xp.int32)  # some namespaces take no uint8 index
    values = xp.take(xp.asarray(dynamic_map(), dtype=xp.float32), index)
    scaled = split_blocks(values, NESTED_BLOCKSIZE, xp=xp) * nested.nested_absmax[:, None]
    return xp.reshape(scaled, (-1,))[:n] + xp.asarray(nested.offset, dtype=xp.float32)


def _nearest_cuda(vn: Any, *, xp: Any) -> Any:
    code = xp.asarray(dynamic_map(), dtype=xp.float32)
    pivot = xp.full(vn.shape, 127, dtype=xp.int32)
    lower_pivot = xp.zeros(vn.shape, dtype=xp.int32)
    upper_pivot = xp.full(vn.shape, 255, dtype=xp.int32)
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = vn > xp.take(code, pivot)
        lower_pivot = xp.where(up, pivot, lower_pivot)
        upper_pivot = xp.where(up, upper_pivot, pivot)
        pivot = xp.where(up, pivot + step, pivot - step)
    value = xp.take(code, pivot)
    above = (xp.take(code, upper_pivot) + value) * 0.5   # float32 midpoints, as the kernel forms them
    below = (xp.take(code, lower_pivot) + value) * 0.5
    index = xp.where(vn > value, xp.where(vn > above, upper_pivot, pivot), xp.where(vn < below, lower_pivot, pivot))
    return xp.astype(index, xp.uint8)


def _nearest_cpu(vn: Any, *, xp: Any) -> Any:
    bins = xp.astype(xp.arange(_CPU_BINS), xp.float32)
    bin_values = -1.0 + (2.0 * bins) / float(_CPU_BINS - 1)                               # float32
    table = xp.astype(xp.searchsorted(xp.asarray(midpoints(dynamic_map()), dtype=xp.float32), bin_values,
                                      side="left"), xp.uint8)                              # #{m : m < value}
    scaled = (xp.clip(vn, -1.0, 1.0) + 1.0) * 0.5 * float(_CPU_BINS - 1) + 0.5             # float32
    return xp.take(table, xp.astype(scaled, xp.int32))                                     # truncation
