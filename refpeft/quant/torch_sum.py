"""torch's CPU float32 sum and mean, in torch's own summation order (ATen `cascade_sum`, SumKernel.cpp).

bitsandbytes' double quantisation subtracts `absmax.mean()`, a float32 number whose rounding
depends on the order torch adds the terms in. On CPU, for a contiguous 1-D float32 tensor x of
length n, `x.sum()` is (L = 8 lanes, T = torch.get_num_threads() when the sum ran):

    mean(x)  = f32(sum(x) / f32(n))                              # sum, then one float32 division
    sum(x)   = chunks: if n >= 32768 (GRAIN_SIZE) and T > 1, x is cut into min(T, ceil(n / 32768))
               chunks of ceil(n / that) (the last shorter), each summed as below into a per-thread
               slot (T slots, unused ones 0), and the T slots are summed as below; else one chunk
    chunk(x) = if len(x) >= L: vectors  v_i = x[iL : (i+1)L], i < m = len(x) // L
                   lanes = row_sum(v_0 .. v_(m-1))                # L lanes summed at once
                   s = 0; s += x[mL:] one by one; s += lanes[0]; ...; s += lanes[L-1]
               else: row_sum(x) on scalars
    row_sum(y_0 .. y_(k-1)) = four interleaved rows r = 0..3, row r holding y_(4i+r), i < q = k // 4:
               p_r = multi_row_sum(row r); p_0 += y_(4q:) one by one; p_0 += p_1; += p_2; += p_3
    multi_row_sum(z_0 .. z_(q-1)): step = 2^max(4, ceil(log2 q) // 4); four accumulator levels:
               level 0 sums each aligned run of `step` terms one by one (from 0); level 1 sums
               `step` level-0 sums one by one, level 2 `step` level-1 sums, level 3 all level-2
               sums; the terms after the last whole run go to a fresh level 0, which then takes
               level 1, 2 and 3's unflushed sums, in that order.

Every addition is one float32 rounding (no fused operations: SIMD adds are lane-wise), so the
result is a function of (x, T) alone. L = 8 on every x86 CPU: torch's AVX-512 capability runs the
same 8-lane order as its AVX2 and DEFAULT kernels (the sum kernel is not built for AVX-512), checked bit for bit against torch 2.13 under ATEN_CPU_CAPABILITY=default/avx2/avx512 with 1 to 4
threads (tests/test_torch_sum.py). ARM builds (NEON: 4 lanes) were not checked.
Where the order matters: the thread count changes the sum only when n >= 32768 and T > 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.backend import to_numpy
from refpeft.errors import ConfigError, DTypeError, ShapeError

GRAIN_SIZE = 32768            # at::internal::GRAIN_SIZE: the smallest reduction torch splits
LANES = 8                     # Vectorized<float>::size() of the AVX2 / DEFAULT kernels


def torch_cpu_mean(x: Any, *, threads: int = 1) -> float:
    """`x.mean()` of a contiguous 1-D float32 tensor on torch's CPU, as a Python float (a float32 value)."""
    values = _checked(x, threads=threads)
    total = _threaded_sum(values, threads=threads)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(total / np.float32(values.shape[0]))


def torch_cpu_sum(x: Any, *, threads: int = 1) -> float:
    """`x.sum()` of a contiguous 1-D float32 tensor on torch's CPU, as a Python float (a float32 value)."""
    return float(_threaded_sum(_checked(x, threads=threads), threads=threads))


def _checked(x: Any, *, threads: int) -> np.ndarray:
    values = np.asarray(to_numpy(x))
    if values.dtype != np.float32:
        raise DTypeError(f"x has dtype {values.dtype}, expected float32")
    if values.ndim != 1 or values.shape[0] == 0:
        raise ShapeError(f"x has shape {values.shape}, expected a non-empty 1-D array")
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive int, got {threads!r}")
    return values


def _threaded_sum(x: np.ndarray, *, threads: int) -> np.float32:
    n = x.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        if n < GRAIN_SIZE or threads == 1:
            return _chunk_sum(x)
        used = min(threads, -(-n // GRAIN_SIZE))                  # at::parallel_for (OpenMP)
        size = -(-n // used)
        slots = np.zeros(threads, dtype=np.float32)
        for t in range(used):
            if t * size < n:
                slots[t] = _chunk_sum(x[t * size:(t + 1) * size])
        return _chunk_sum(slots)                     # the second pass, same kernel


def _chunk_sum(x: np.ndarray) -> np.float32:
    n = x.shape[0]
    if n < LANES:                                                 # scalar_inner_sum
        return _row_sum(x[:, None])[0]
    m = n // LANES
    vector_sums = _row_sum(np.reshape(x[: m * LANES], (m, LANES)))  # (LANES,)
    total = np.float32(0.0)
    for value in x[m * LANES:]:
        total = np.float32(total + value)
    for value in vector_sums:
        total = np.float32(total + value)
    return total


def _row_sum(y: np.ndarray) -> np.ndarray:
    """row_sum over the k items y[i] (each a vector of lanes): (k, lanes) -> (lanes,)."""
    q = y.shape[0] // 4
    rows = np.reshape(y[: 4 * q], (q, 4, y.shape[1]))                 # row r holds y[4i + r]
    partial = _multi_row_sum(rows)                                     # (4, lanes)
    first = _sequential(np.concatenate([partial[:1], y[4 * q:]]))       # p_0 += leftovers
    return _sequential(np.stack([first, partial[1], partial[2], partial[3]]))


def _multi_row_sum(z: np.ndarray) -> np.ndarray:
    """The four-level cascade over axis 0 of z (q, ...): the accumulators' final sum (...)."""
    q = z.shape[0]
    power = max(4, _ceil_log2(q) // 4)
    step = 1 << power
    runs = q // step
    level = _sequential(np.reshape(z[: runs * step], (runs, step) + z.shape[1:]), axis=1)  # (runs, ...)
    unflushed = []
    for _ in range(2):                  # levels 1 and 2: flushed every `step` sums
        whole = level.shape[0] // step
        unflushed.append(_sequential(level[whole * step:]))
        level = _sequential(np.reshape(level[: whole * step], (whole, step) + z.shape[1:]), axis=1)
    top = _sequential(level)            # level 3 is never flushed
    rest = _sequential(z[runs * step:])
    return _sequential(np.stack([rest, unflushed[0], unflushed[1], top]))


def _sequential(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """0 + a[0] + a[1] + ... along `axis`, one float32 rounding per addition."""
    a = np.moveaxis(a, axis, 0)
    total = np.zeros(a.shape[1:], dtype=np.float32)
    for term in a:
        total = total + term
    return total


def _ceil_log2(q: int) -> int:
    """c10::utils::CeilLog2: 0 for q <= 1, else the bit length of q - 1."""
    return 0 if q <= 1 else (q - 1).bit_length()
